// pushgate's demo in a real browser: headless Chromium (Debian's `chromium`)
// driven by playwright-core. tests/clients/browser.rs runs one scenario per test:
//
//   node run.mjs --scenario NAME --pushgate BIN --artifacts DIR [--redis URL]
//
// Scenarios:
//   websocket       log in, chat through the form, publishes from the API,
//                   a notification, and the browser going offline and back
//   fallback        WebSocket blocked, then SSE blocked: the page falls back
//                   to SSE, then to long-poll, without losing a message
//   restart-redis   pushgate restarted on the Redis engine (publications
//                   made meanwhile by another node): resumed without loss
//   restart-memory  pushgate restarted on the memory engine: the page shows
//                   the reset event and goes on
//   two-way         two users' pages: each asks the app who is online (rpc),
//                   and sees the other typing (publishes from the page)
//   compression     a WebSocket of the page's own negotiates permessage-deflate
//                   (ws.extensions), gets a large publication (sent
//                   compressed) and a small one intact, and its subscribe
//                   command (which Chromium compresses) answered
//
// It starts `pushgate demo` itself (on 127.0.0.1:0, then again on the same
// port for a restart), kills every process it started on the way out, and
// bounds every wait. A screenshot of the page is kept in the artifacts
// folder. Exit status 0 means every check passed.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: args } = parseArgs({
  options: {
    scenario: { type: "string" },
    pushgate: { type: "string" },
    artifacts: { type: "string" },
    redis: { type: "string" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
  },
});

/** How long any one thing may take. */
const PATIENCE = 30000;
/** The whole run's bound; the Rust test has its own behind it. */
const BUDGET = 170000;

const children = new Set();
const scratch = mkdtempSync(join(tmpdir(), "pushgate-browser-"));
let context;

function log(...parts) {
  console.log(`[${new Date().toISOString().slice(11, 23)}]`, ...parts);
}

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

function deadline(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Starts a process and reads its stdout and stderr lines until `ready(line)` returns a value. */
function start(command, argv, env, ready, what) {
  const child = spawn(command, argv, { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);
  const output = [];
  child.exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve(code ?? signal)));
  child.exited.then(() => children.delete(child));
  const found = new Promise((resolve, reject) => {
    let value;
    const result = {};
    for (const stream of [child.stdout, child.stderr]) {
      let buffer = "";
      stream.setEncoding("utf8");
      stream.on("data", (chunk) => {
        const lines = (buffer += chunk).split("\n");
        buffer = lines.pop();
        for (const line of lines) {
          output.push(line);
          if (value === undefined && (value = ready(line, result)) !== undefined) resolve(value);
        }
      });
    }
    child.exited.then((code) => reject(new Error(`${what} exited (${code}) before it was ready:\n${output.join("\n")}`)));
  });
  child.output = output;
  return { child, found: deadline(found, PATIENCE, what) };
}

/** `pushgate demo` on `listen`; resolves once it printed its addresses. */
async function startDemo(listen = "127.0.0.1:0") {
  const argv = ["demo", "--listen", listen, "--api-listen", "127.0.0.1:0"];
  if (args.redis) argv.push("--redis", args.redis);
  const { child, found } = start(
    args.pushgate,
    argv,
    {},
    (line, seen) => {
      const match = line.match(/^pushgate demo: open (\S+)/) || line.match(/^ {2}(api|key) +(\S+)$/);
      if (!match) return undefined;
      if (match.length == 2) seen.url = match[1];
      else seen[match[1]] = match[2];
      return seen.url && seen.api && seen.key ? { ...seen } : undefined;
    },
    "pushgate demo",
  );
  const demo = { child, ...(await found) };
  demo.port = new URL(demo.url).port;
  log("demo at", demo.url, "api", demo.api);
  return demo;
}

/** `pushgate demo` again on `port`: it may take the kernel a moment to free it. */
async function restartDemo(port) {
  const until = Date.now() + PATIENCE;
  for (;;) {
    try {
      return await startDemo(`127.0.0.1:${port}`);
    } catch (error) {
      if (Date.now() > until || !/cannot listen/.test(error.message)) throw error;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
}

/** SIGTERM, and the drain pushgate does then; SIGKILL if it takes too long. */
async function stop(child) {
  child.kill("SIGTERM");
  try {
    return await deadline(child.exited, PATIENCE, "pushgate to exit after SIGTERM");
  } catch (error) {
    child.kill("SIGKILL");
    throw error;
  }
}

async function api(base, key, path, body) {
  const response = await fetch(`${base}${path}`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const text = await response.text();
  check(response.ok, `${path}: ${response.status} ${text}`);
  return JSON.parse(text);
}

const say = (base, key, text) =>
  api(base, key, "/api/publish", { channel: "chat:lobby", event: "message", data: { from: "api", text } });

async function browser() {
  const profile = join(scratch, "profile");
  context = await chromium.launchPersistentContext(profile, {
    executablePath: args.chromium,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    viewport: { width: 1000, height: 900 },
  });
  context.setDefaultTimeout(PATIENCE);
  const page = context.pages()[0] || (await context.newPage());
  page.on("console", (message) => log("page console:", message.text()));
  page.on("pageerror", (error) => log("page error:", error.message));
  return page;
}

/** A second browser, with cookies of its own: another user. */
async function secondBrowser() {
  const other = await chromium.launch({
    executablePath: args.chromium,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"],
  });
  const page = await (await other.newContext({ viewport: { width: 1000, height: 900 } })).newPage();
  page.setDefaultTimeout(PATIENCE);
  page.on("pageerror", (error) => log("second page error:", error.message));
  return { other, page };
}

async function login(page, url, name) {
  await page.goto(url);
  await page.fill('#login input[name="name"]', name);
  await page.click('#login button');
  await connected(page, "websocket");
  check((await page.textContent("#me")) == name, "logged in by name");
}

async function connected(page, transport) {
  await page.waitForFunction(
    (transport) => document.body.dataset.state == "connected" && document.body.dataset.transport == transport,
    transport,
  );
  log("connected over", transport);
}

const lobby = (page) => page.$$eval("#messages li", (items) => items.map((li) => li.textContent));

/** Waits until the lobby shows exactly `expected`, in order. */
async function lobbyIs(page, expected) {
  try {
    await page.waitForFunction(
      (expected) => {
        const shown = [...document.querySelectorAll("#messages li")].map((li) => li.textContent);
        return shown.length >= expected.length;
      },
      expected,
    );
  } catch (error) {
    throw new Error(`the lobby shows ${JSON.stringify(await lobby(page))}, expected ${JSON.stringify(expected)}: ${error.message}`);
  }
  const shown = await lobby(page);
  check(JSON.stringify(shown) == JSON.stringify(expected), `lobby ${JSON.stringify(shown)} == ${JSON.stringify(expected)}`);
}

/** How many lobby publications the library delivered to the page. */
const delivered = (page) => page.evaluate(() => Number(document.body.dataset.delivered || 0));

const events = (page) => page.$$eval("#events li", (items) => items.map((li) => li.textContent).reverse());

async function screenshot(page, name) {
  const path = join(args.artifacts, `${name}.png`);
  await page.screenshot({ path, fullPage: true });
  log("screenshot:", path);
}

const scenarios = {
  async websocket() {
    const demo = await startDemo();
    const page = await browser();
    await login(page, demo.url, "ada");

    await page.fill('#say input[name="text"]', "hello from the page");
    await page.click("#say button");
    const expected = ["ada: hello from the page"];
    await lobbyIs(page, expected);

    for (let n = 1; n <= 5; n++) {
      await say(demo.api, demo.key, `api ${n}`);
      expected.push(`api: api ${n}`);
    }
    await lobbyIs(page, expected);

    await page.fill('#notify input[name="to"]', "ada");
    await page.fill('#notify input[name="text"]', "a note to self");
    await page.click("#notify button");
    await page.waitForFunction(() => document.querySelector("#notes li")?.textContent == "ada: a note to self");

    // Offline: the client drops its connection and waits; back online it
    // reconnects at once and resumes.
    await context.setOffline(true);
    await page.waitForFunction(() => document.body.dataset.state == "offline");
    for (let n = 1; n <= 3; n++) {
      await say(demo.api, demo.key, `while offline ${n}`);
      expected.push(`api: while offline ${n}`);
    }
    await context.setOffline(false);
    await connected(page, "websocket");
    await lobbyIs(page, expected);

    // The page loads the lobby's history, then goes live from its position.
    await page.reload();
    await connected(page, "websocket");
    await lobbyIs(page, expected);
    await say(demo.api, demo.key, "after the reload");
    expected.push("api: after the reload");
    await lobbyIs(page, expected);
    await screenshot(page, "demo-websocket");
    await stop(demo.child);
  },

  async fallback() {
    const demo = await startDemo();
    const page = await browser();
    await login(page, demo.url, "bob");
    const expected = [];
    const burst = async (label) => {
      for (let n = 1; n <= 5; n++) {
        await say(demo.api, demo.key, `${label} ${n}`);
        expected.push(`api: ${label} ${n}`);
      }
    };
    await burst("websocket");
    await lobbyIs(page, expected);

    // A proxy that blocks WebSocket: every new WebSocket fails before it
    // opens. The app cuts the current one (4008: reconnect and resume), and
    // publishes while the page finds its way.
    await page.routeWebSocket(/\/realtime\/ws/, (ws) => ws.close({ code: 1006 }));
    await api(demo.api, demo.key, "/api/disconnect", { user: "bob", code: 4008, reason: "move along" });
    await burst("switching to sse");
    await connected(page, "sse");
    await burst("sse");
    await lobbyIs(page, expected);

    // Now SSE is blocked too.
    await page.route(/\/realtime\/sse/, (route) => route.abort("connectionrefused"));
    await api(demo.api, demo.key, "/api/disconnect", { user: "bob", code: 4008, reason: "move along again" });
    await burst("switching to poll");
    await connected(page, "poll");
    await burst("poll");
    await lobbyIs(page, expected);

    check((await delivered(page)) == expected.length, "each publication delivered once");
    const seen = await events(page);
    check(seen.some((e) => e.endsWith("falling back to sse")), `a fallback to sse in ${JSON.stringify(seen)}`);
    check(seen.some((e) => e.endsWith("falling back to poll")), `a fallback to poll in ${JSON.stringify(seen)}`);
    check(!seen.some((e) => e.includes("reset")), "no reset");
    await screenshot(page, "demo-fallback");
    await stop(demo.child);
  },

  async "restart-redis"() {
    check(args.redis, "--redis is required");
    let demo = await startDemo();
    // Another pushgate node on the same Redis publishes while the demo is
    // down, as any node of a cluster may.
    const config = join(scratch, "node.yaml");
    writeFileSync(
      config,
      `listen: 127.0.0.1:0\nupstream:\n  url: http://127.0.0.1:9\napi:\n  listen: 127.0.0.1:0\n  keys: [other-node-key]\nauth:\n  mode: none\nengine:\n  kind: redis\n  redis:\n    url: ${args.redis}\nlog:\n  format: json\n`,
    );
    const other = start(
      args.pushgate,
      ["--config", config],
      {},
      (line) => {
        try {
          const event = JSON.parse(line);
          return event.message == "listening" ? `http://${event.api_addr}` : undefined;
        } catch {
          return undefined;
        }
      },
      "the other pushgate node",
    );
    const otherApi = await other.found;

    const page = await browser();
    await login(page, demo.url, "cy");
    const expected = [];
    for (let n = 1; n <= 3; n++) {
      await say(demo.api, demo.key, `before ${n}`);
      expected.push(`api: before ${n}`);
    }
    await lobbyIs(page, expected);

    await stop(demo.child);
    await page.waitForFunction(() => document.body.dataset.state != "connected");
    for (let n = 1; n <= 5; n++) {
      await say(otherApi, "other-node-key", `while down ${n}`);
      expected.push(`api: while down ${n}`);
    }
    demo = await restartDemo(demo.port);
    await connected(page, "websocket");
    await lobbyIs(page, expected);
    await say(demo.api, demo.key, "after");
    expected.push("api: after");
    await lobbyIs(page, expected);
    check(!(await page.evaluate(() => document.body.dataset.resets)), "no reset on the Redis engine");
    check((await delivered(page)) == expected.length, "each publication delivered once");
    await screenshot(page, "demo-restart-redis");
    await stop(demo.child);
    await stop(other.child);
  },

  async "restart-memory"() {
    let demo = await startDemo();
    const page = await browser();
    await login(page, demo.url, "dee");
    await say(demo.api, demo.key, "before the restart");
    await lobbyIs(page, ["api: before the restart"]);
    await page.fill('#notify input[name="to"]', "dee");
    await page.fill('#notify input[name="text"]', "a note before the restart");
    await page.click("#notify button");
    await page.waitForFunction(() => document.querySelector("#notes li")?.textContent == "dee: a note before the restart");

    await stop(demo.child);
    await page.waitForFunction(() => document.body.dataset.state != "connected");
    demo = await restartDemo(demo.port);
    await connected(page, "websocket");
    // The new process has new streams: the page is told, and reloads the
    // lobby from the app (empty now).
    await page.waitForFunction(() => Number(document.body.dataset.resets) >= 1);
    // The first reset may be the notifications': the lobby empties once its
    // own reset has reloaded it from the app.
    await page.waitForFunction(() => document.querySelectorAll("#messages li").length == 0);
    await lobbyIs(page, []);
    const seen = await events(page);
    check(
      seen.some((e) => e.includes("reset on chat:lobby") && e.includes("reloaded from the app")),
      `the lobby's reset says it is reloaded, in ${JSON.stringify(seen)}`,
    );
    // The notifications only pushgate had: kept as they were, with the
    // gap marked after them, as the page says.
    await page.waitForFunction(() => document.querySelectorAll("#notes li").length >= 2);
    const notes = await page.$$eval("#notes li", (items) => items.map((li) => li.textContent));
    check(
      notes[0] == "dee: a note before the restart" && notes[notes.length - 1].includes("may be missing"),
      `the notifications keep the old note and mark the gap: ${JSON.stringify(notes)}`,
    );
    check(
      seen.some((e) => e.includes("reset on user:dee:notifications") && e.includes("the line marks the gap")),
      `the notifications' reset says what the page did, in ${JSON.stringify(seen)}`,
    );
    await say(demo.api, demo.key, "after the restart");
    await lobbyIs(page, ["api: after the restart"]);
    await screenshot(page, "demo-restart-memory");
    await stop(demo.child);
  },

  async "two-way"() {
    const demo = await startDemo();
    const ada = await browser();
    await login(ada, demo.url, "ada");
    // The page asks the app who is online once connected.
    await ada.waitForFunction(() => document.body.dataset.online == "ada");
    const { other, page: bob } = await secondBrowser();
    try {
      await login(bob, demo.url, "bob");
      await bob.waitForFunction(() => document.body.dataset.online == "ada,bob");
      // Asked again, ada's page hears of bob (once his subscription is listed).
      const until = Date.now() + PATIENCE;
      for (;;) {
        const answers = await ada.evaluate(() => Number(document.body.dataset.onlineAnswers));
        await ada.click("#who");
        await ada.waitForFunction((n) => Number(document.body.dataset.onlineAnswers) > n, answers);
        const online = await ada.evaluate(() => document.body.dataset.online);
        if (online == "ada,bob") break;
        check(Date.now() < until, `ada's page lists ${online}, not ada and bob`);
      }
      check((await ada.textContent("#online")) == "ada, bob", "the list shown");

      // bob types: ada's page shows it, under the name pushgate set; his
      // message clears it.
      await bob.type('#say input[name="text"]', "hi ada");
      await ada.waitForFunction(() => document.body.dataset.typing == "bob");
      check((await ada.textContent("#typing")) == "bob is typing…", "the typing line");
      check(!(await bob.evaluate(() => document.body.dataset.typing)), "bob's page does not show bob typing");
      await screenshot(ada, "demo-two-way");
      await bob.click("#say button");
      await lobbyIs(ada, ["bob: hi ada"]);
      await ada.waitForFunction(() => document.body.dataset.typing == "");
    } finally {
      await other.close();
    }
    await stop(demo.child);
  },

  async compression() {
    const demo = await startDemo();
    const page = await browser();
    await login(page, demo.url, "ada");
    const extensions = await openRawSocket(page);
    check(extensions.startsWith("permessage-deflate"), `the page's WebSocket negotiated ${JSON.stringify(extensions)}`);
    log("negotiated:", extensions);

    // A command long enough that Chromium sends it compressed.
    await page.evaluate(() =>
      window.raw.ws.send(JSON.stringify({ id: 1, op: "subscribe", channel: "chat:lobby", note: "x".repeat(1000) })),
    );
    const reply = await rawMessage(page, "id", 1);
    check(reply.result && typeof reply.result.epoch == "string", `subscribe answered ${JSON.stringify(reply)}`);

    const large = { from: "api", text: "a large message, said again and again; ".repeat(100) };
    const small = { from: "api", text: "small" };
    const sent = [];
    for (const data of [large, small]) {
      const { results } = await api(demo.api, demo.key, "/api/publish", { channel: "chat:lobby", event: "message", data });
      sent.push({ channel: "chat:lobby", epoch: results[0].epoch, offset: results[0].offset, event: "message", data });
    }
    check(JSON.stringify(large).length > 2048, "the large publication is over 2 KiB");
    for (const envelope of sent) {
      const got = await rawMessage(page, "offset", envelope.offset);
      check(JSON.stringify(got) == JSON.stringify(envelope), `expected ${JSON.stringify(envelope)}, got ${JSON.stringify(got)}`);
    }
    log("a large and a small publication arrived intact");
    // The client library's own connection is unaffected.
    await lobbyIs(page, [`api: ${large.text}`, "api: small"]);
    await screenshot(page, "demo-compression");
    await stop(demo.child);
  },
};

/** Opens a WebSocket to pushgate from the page; its `extensions`. */
async function openRawSocket(page) {
  return page.evaluate(async (patience) => {
    const ws = new WebSocket(`ws://${location.host}/realtime/ws`);
    window.raw = { ws, messages: [] };
    ws.onmessage = (event) => window.raw.messages.push(JSON.parse(event.data));
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new Error("the page's WebSocket failed"));
      setTimeout(() => reject(new Error("the page's WebSocket did not open")), patience);
    });
    return ws.extensions;
  }, PATIENCE);
}

/** The first message the page's own WebSocket got whose `field` is `value`. */
async function rawMessage(page, field, value) {
  const found = await page.waitForFunction(
    ([field, value]) => window.raw.messages.find((message) => message[field] === value),
    [field, value],
  );
  return found.jsonValue();
}

async function main() {
  const scenario = scenarios[args.scenario];
  check(scenario, `--scenario is one of ${Object.keys(scenarios).join(", ")}`);
  check(args.pushgate && args.artifacts, "--pushgate and --artifacts are required");
  log("scenario", args.scenario);
  await deadline(scenario(), BUDGET, `scenario ${args.scenario}`);
  log("passed");
}

let status = 0;
try {
  await main();
} catch (error) {
  status = 1;
  console.error(error.stack || String(error));
  for (const child of children) console.error(`--- output of a child process:\n${child.output.join("\n")}`);
} finally {
  await context?.close().catch(() => {});
  for (const child of children) child.kill("SIGKILL");
  rmSync(scratch, { recursive: true, force: true });
}
process.exit(status);
