// Laravel Echo with its Pusher connector, in headless Chromium (Debian's
// `chromium`, driven by playwright-core), against pushgate deployed as a
// Laravel app's sidecar: this script is the app. It serves the page (which
// loads pusher-js and laravel-echo from node_modules, unchanged) and
// /broadcasting/auth, answering exactly as Laravel's Pusher broadcaster does
// (`{"auth":"key:signature"}`, and `channel_data` with the user's integer id
// on presence channels), and it broadcasts with Pusher's Node SDK the way
// Laravel does (the event's class name, or its broadcastAs name; `toOthers()`
// as the X-Socket-Id header's socket_id). pushgate proxies the pages to it
// and serves the WebSocket on the same origin.
//
// tests/clients/pusher.rs runs it in two steps, because pushgate's upstream
// is this app:
//
//   node echo.mjs --app-id ID --key KEY --secret SECRET --chromium PATH
//       prints `app-listening http://127.0.0.1:PORT`, then reads one line of
//       JSON from stdin: {"public": "ADDR", "api": "ADDR"} (pushgate, started
//       with that upstream)
//
// Checks: Echo.private('orders.1').listen('.OrderShipped') and
// .listen('OrderShipped') (App\Events\OrderShipped) receive the events;
// `toOthers()` skips the sender's page; a channel the user may not see fails
// with Echo's error(); Echo.join('room.1') here/joining/leaving; whisper and
// listenForWhisper between two pages.
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";
import { check, checkEqual, deadline, log, main, PATIENCE, playwright, PusherServer, splitAddr } from "./lib.mjs";

const { values: opts } = parseArgs({
  options: {
    "app-id": { type: "string" },
    key: { type: "string" },
    secret: { type: "string" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
  },
});
const BUDGET = 120000;
const CSRF = "laravel-csrf-token-for-the-test";
/** The app's users, by the session cookie's value; ids are integers, as Eloquent's are. */
const USERS = { alice: { id: 1, name: "Alice" }, bob: { id: 2, name: "Bob" } };

const MODULES = new URL("../browser/node_modules/", import.meta.url);
const SCRIPTS = {
  "/js/pusher.js": readFileSync(new URL("pusher-js/dist/web/pusher.js", MODULES)),
  "/js/echo.js": readFileSync(new URL("laravel-echo/dist/echo.iife.js", MODULES)),
};

/** The page: Echo configured as resources/js/echo.js does for Pusher. */
function page(key, wsPort) {
  return `<!doctype html>
<html><head><meta charset="utf-8"><meta name="csrf-token" content="${CSRF}">
<title>orders</title>
<script src="/js/pusher.js"></script>
<script src="/js/echo.js"></script>
</head><body><h1>orders</h1><pre id="log"></pre>
<script>
  window.seen = [];
  const note = (what, data) => {
    window.seen.push({ what, data });
    document.getElementById("log").textContent += what + " " + JSON.stringify(data) + "\\n";
  };
  window.Echo = new Echo.default({
    broadcaster: "pusher",
    key: ${JSON.stringify(key)},
    cluster: "mt1",
    wsHost: location.hostname,
    wsPort: ${wsPort},
    forceTLS: false,
    enabledTransports: ["ws"],
    disableStats: true,
  });
  window.Echo.connector.pusher.connection.bind("connected", () => note("connected", window.Echo.socketId()));
  window.Echo.private("orders.1")
    .subscribed(() => note("orders.1:subscribed", null))
    .listen(".OrderShipped", (e) => note(".OrderShipped", e))
    .listen("OrderShipped", (e) => note("App\\\\Events\\\\OrderShipped", e))
    .error((e) => note("orders.1:error", e));
  window.Echo.private("orders.2")
    .subscribed(() => note("orders.2:subscribed", null))
    .error((e) => note("orders.2:error", e));
  window.Echo.join("room.1")
    .here((users) => note("here", users))
    .joining((user) => note("joining", user))
    .leaving((user) => note("leaving", user))
    .listenForWhisper("typing", (e) => note("whisper", e))
    .error((e) => note("room.1:error", e));
  window.ship = (order) =>
    fetch("/orders/" + order + "/ship", {
      method: "POST",
      headers: { "X-CSRF-TOKEN": ${JSON.stringify(CSRF)}, "X-Socket-Id": window.Echo.socketId() },
    }).then((r) => r.status);
</script></body></html>`;
}

/** routes/channels.php: who may hear what. */
function authorize(user, channel) {
  if (channel === "private-orders.1") return true;
  if (channel === "private-orders.2") return false;
  if (channel === "presence-room.1") return { id: user.id, name: user.name };
  return false;
}

function readBody(req) {
  return new Promise((resolve) => {
    let body = "";
    req.setEncoding("utf8");
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => resolve(body));
  });
}

function cookie(req, name) {
  const match = (req.headers.cookie || "").match(new RegExp(`(?:^|;\\s*)${name}=([^;]*)`));
  return match ? match[1] : undefined;
}

/** The app; `pushgate` is filled in once pushgate runs in front of it. */
function app(state) {
  return createServer(async (req, res) => {
    const body = await readBody(req);
    const user = USERS[cookie(req, "laravel_session")];
    state.requests.push(`${req.method} ${req.url}`);
    const url = new URL(req.url, "http://app");
    if (req.method === "GET" && url.pathname === "/") {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
      res.end(page(opts.key, state.wsPort));
    } else if (req.method === "GET" && SCRIPTS[url.pathname]) {
      res.writeHead(200, { "content-type": "text/javascript" }).end(SCRIPTS[url.pathname]);
    } else if (req.method === "POST" && url.pathname === "/broadcasting/auth") {
      // Laravel: the CSRF middleware, then the session's user, then the
      // channel's callback; PusherBroadcaster::validAuthenticationResponse.
      if (req.headers["x-csrf-token"] !== CSRF) return res.writeHead(419).end("CSRF token mismatch.");
      if (!user) return res.writeHead(403).end();
      const form = new URLSearchParams(body);
      const channel = form.get("channel_name");
      const socketId = form.get("socket_id");
      state.auths.push({ channel, socketId, user: user.id });
      const result = authorize(user, channel);
      if (!result) return res.writeHead(403).end();
      const answer = channel.startsWith("presence-")
        ? state.sdk.authorizeChannel(socketId, channel, { user_id: user.id, user_info: result })
        : state.sdk.authorizeChannel(socketId, channel);
      res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(answer));
    } else if (req.method === "POST" && url.pathname === "/orders/1/ship") {
      // broadcast(new OrderShipped($order))->toOthers(): the class name as
      // the event, the public properties as data, X-Socket-Id excluded.
      if (req.headers["x-csrf-token"] !== CSRF) return res.writeHead(419).end("CSRF token mismatch.");
      const socketId = req.headers["x-socket-id"];
      await state.sdk.trigger(
        "private-orders.1",
        "App\\Events\\OrderShipped",
        { order: { id: 1, status: "shipped" }, by: user && user.name },
        socketId ? { socket_id: socketId } : undefined,
      );
      res.writeHead(200, { "content-type": "application/json" }).end("{}");
    } else {
      res.writeHead(404).end("not found");
    }
  });
}

/** The page's notes so far. */
function notes(p) {
  return p.evaluate(() => window.seen);
}

/** Waits until the page noted `what` (and `pred(data)` holds); its data. */
async function noted(p, who, what, pred = () => true) {
  const end = Date.now() + PATIENCE;
  for (;;) {
    const all = await notes(p);
    const found = all.find((n) => n.what === what && pred(n.data));
    if (found) return found.data;
    if (Date.now() > end) {
      throw new Error(`check failed: ${who}'s page never noted ${what}; it noted ${JSON.stringify(all)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

main(BUDGET, async (cleanups) => {
  for (const name of ["app-id", "key", "secret"]) check(opts[name], `--${name} is required`);
  const state = { requests: [], auths: [] };
  const http = app(state);
  await new Promise((resolve) => http.listen(0, "127.0.0.1", resolve));
  cleanups.push(() => http.close());
  cleanups.push(() => http.closeAllConnections());
  console.log(`app-listening http://127.0.0.1:${http.address().port}`);

  const lines = createInterface({ input: process.stdin });
  const line = await deadline(
    new Promise((resolve) => lines.once("line", resolve)),
    PATIENCE,
    "pushgate's addresses on stdin",
  );
  lines.close();
  const gate = JSON.parse(line);
  const [apiHost, apiPort] = splitAddr(gate.api);
  const [, publicPort] = splitAddr(gate.public);
  state.wsPort = Number(publicPort);
  state.sdk = new PusherServer({
    appId: opts["app-id"],
    key: opts.key,
    secret: opts.secret,
    host: apiHost,
    port: apiPort,
    useTLS: false,
    timeout: PATIENCE,
  });
  log("pushgate at", gate.public, "api", gate.api);

  const browser = await playwright().chromium.launch({
    executablePath: opts.chromium,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"],
  });
  cleanups.push(() => browser.close());
  const origin = `http://${gate.public}`;
  const open = async (user) => {
    const context = await browser.newContext();
    await context.addCookies([{ name: "laravel_session", value: user, url: origin }]);
    const p = await context.newPage();
    p.on("console", (m) => log(`${user}'s console:`, m.text()));
    p.on("pageerror", (e) => log(`${user}'s page error:`, e.message));
    await p.goto(`${origin}/`, { timeout: PATIENCE });
    await noted(p, user, "connected");
    return p;
  };

  const alice = await open("alice");
  await noted(alice, "alice", "orders.1:subscribed");
  const here = await noted(alice, "alice", "here");
  checkEqual(here, [{ id: 1, name: "Alice" }], "Echo.join('room.1').here for alice alone");
  const denied = await noted(alice, "alice", "orders.2:error");
  check(denied && denied.status === 403, `orders.2 refused by the app: ${JSON.stringify(denied)}`);
  check(
    !(await notes(alice)).some((n) => n.what === "orders.2:subscribed"),
    "a channel the app refused was subscribed",
  );
  log("alice: orders.1 subscribed, orders.2 refused by the app, here() lists her");
  const aliceAuth = state.auths.find((a) => a.channel === "presence-room.1");
  check(aliceAuth && aliceAuth.user === 1, "the page asked /broadcasting/auth through pushgate for presence-room.1");

  const bob = await open("bob");
  await noted(bob, "bob", "orders.1:subscribed");
  const bobHere = await noted(bob, "bob", "here");
  checkEqual(
    [...bobHere].sort((a, b) => a.id - b.id),
    [
      { id: 1, name: "Alice" },
      { id: 2, name: "Bob" },
    ],
    "here() for bob",
  );
  checkEqual(await noted(alice, "alice", "joining"), { id: 2, name: "Bob" }, "alice's joining()");
  log("presence: here and joining");

  // Events as Laravel broadcasts them.
  await state.sdk.trigger("private-orders.1", "OrderShipped", { order: { id: 1 }, via: "broadcastAs" });
  for (const [who, p] of [
    ["alice", alice],
    ["bob", bob],
  ]) {
    const got = await noted(p, who, ".OrderShipped");
    checkEqual(got, { order: { id: 1 }, via: "broadcastAs" }, `${who}'s .OrderShipped`);
  }
  await state.sdk.trigger("private-orders.1", "App\\Events\\OrderShipped", { order: { id: 1 }, via: "class" });
  for (const [who, p] of [
    ["alice", alice],
    ["bob", bob],
  ]) {
    const got = await noted(p, who, "App\\Events\\OrderShipped", (d) => d.via === "class");
    checkEqual(got, { order: { id: 1 }, via: "class" }, `${who}'s App\\Events\\OrderShipped`);
  }
  log("Laravel-style event names: .OrderShipped and App\\Events\\OrderShipped");

  // toOthers(): alice ships; bob hears it, alice's page does not.
  const status = await alice.evaluate(() => window.ship(1));
  checkEqual(status, 200, "the ship request through pushgate");
  await noted(bob, "bob", "App\\Events\\OrderShipped", (d) => d.by === "Alice");
  await state.sdk.trigger("private-orders.1", "OrderShipped", { marker: true });
  await noted(alice, "alice", ".OrderShipped", (d) => d.marker === true);
  check(
    !(await notes(alice)).some((n) => n.what === "App\\Events\\OrderShipped" && n.data.by === "Alice"),
    "toOthers(): the sender's page got its own broadcast",
  );
  log("toOthers(): the X-Socket-Id page skipped, the other got it");

  // Whisper (client events) on the presence channel.
  await alice.evaluate(() => window.Echo.join("room.1").whisper("typing", { name: "Alice" }));
  checkEqual(await noted(bob, "bob", "whisper"), { name: "Alice" }, "bob's listenForWhisper");
  log("whisper reached the other page");

  await bob.context().close();
  checkEqual(await noted(alice, "alice", "leaving"), { id: 2, name: "Bob" }, "alice's leaving()");
  log("presence: leaving");

  const errors = (await notes(alice)).filter((n) => n.what.endsWith(":error") && n.what !== "orders.2:error");
  checkEqual(errors, [], "errors alice's page noted");
});
