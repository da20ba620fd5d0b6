// The example app examples/pusher-chat (Flask, Pusher's Python server SDK,
// pusher-js in the page) behind pushgate, used in headless Chromium (Debian's
// `chromium`, driven by playwright-core) as people use it: through its own
// forms, on pushgate's public listener only.
//
//   node pusher_chat.mjs --gate ADDR --chromium PATH
//
// tests/clients/pusher_example.rs starts pushgate and the app, then this.
//
// Checks: two users log in, join presence-lobby and see each other online;
// a lobby message sent with the app's form (the SDK's trigger) shows on the
// other page; a direct message on the recipient's private channel reaches
// only them; the app's auth endpoint refuses another user's private channel,
// which pusher-js reports; the app's webhook endpoint received, verified and
// kept channel_occupied and member_added (and refused a forged one); a user
// leaving disappears from the other page and comes as member_removed.
import { createHmac } from "node:crypto";
import { parseArgs } from "node:util";
import { check, checkEqual, log, main, PATIENCE, playwright } from "./lib.mjs";

const { values: opts } = parseArgs({
  options: {
    gate: { type: "string" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
  },
});
const BUDGET = 120000;
const LOBBY = "presence-lobby";

/** Waits until `read(page)` satisfies `pred`; its value. */
async function until(p, who, what, read, pred) {
  const end = Date.now() + PATIENCE;
  for (;;) {
    const value = await read(p);
    if (pred(value)) return value;
    if (Date.now() > end) {
      throw new Error(`check failed: ${who}'s page: ${what}; it shows ${JSON.stringify(value)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** The texts of a list on the page. */
const items = (id) => (p) => p.$$eval(`#${id} li`, (lis) => lis.map((li) => li.textContent));
const statusText = (p) => p.textContent("#status");

/** The webhooks the app kept (verified), as it lists them to a logged-in page. */
const kept = (p) =>
  p.evaluate(async () => {
    const answer = await fetch("/webhooks");
    return (await answer.json()).webhooks;
  });

const hasHook = (name, fields = {}) => (hooks) =>
  hooks.some((h) => h.name === name && h.channel === LOBBY && Object.entries(fields).every(([k, v]) => h[k] === v));

main(BUDGET, async (cleanups) => {
  check(opts.gate, "--gate is required");
  const origin = `http://${opts.gate}`;
  const browser = await playwright().chromium.launch({
    executablePath: opts.chromium,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"],
  });
  cleanups.push(() => browser.close());
  const pageErrors = [];

  /** A browser of its own (its own cookie), logged in through the app's form. */
  const login = async (name) => {
    const context = await browser.newContext();
    const p = await context.newPage();
    p.on("console", (m) => log(`${name}'s console:`, m.text()));
    p.on("pageerror", (e) => pageErrors.push(`${name}: ${e.message}`));
    await p.goto(`${origin}/`, { timeout: PATIENCE });
    await p.fill("input[name=name]", name);
    await p.click("button");
    await p.waitForSelector("#status", { timeout: PATIENCE });
    checkEqual(await p.textContent("b"), name, "who the page says is logged in");
    await until(p, name, "connected", statusText, (s) => s === "connected");
    return p;
  };

  const send = async (p, text, to = "") => {
    await p.selectOption("#to", to);
    await p.fill("#say input[name=text]", text);
    await p.click("#say button");
  };

  // Presence: each sees who is online, from the members pusher-js keeps.
  const ann = await login("ann");
  await until(ann, "ann", "ann online alone", items("members"), (m) => m.join() === "ann (you)");
  const bob = await login("bob");
  await until(bob, "bob", "ann and bob online", items("members"), (m) => m.join() === "ann,bob (you)");
  await until(ann, "ann", "bob came online", items("members"), (m) => m.join() === "ann (you),bob");
  log("presence: ann and bob see each other online");

  // A lobby message: bob's form, the app's trigger, ann's page.
  const hello = "hello <b>ann</b> & all";
  await send(bob, hello);
  await until(ann, "ann", "bob's message", items("chat"), (c) => c.includes(`bob: ${hello}`));
  await until(bob, "bob", "his own message", items("chat"), (c) => c.includes(`bob: ${hello}`));
  check((await ann.$$("#chat b")).length === 0, "a message's markup stays text");
  log("lobby: bob's message reached ann");

  // A direct message, on bob's private channel only.
  await send(ann, "just for bob", "bob");
  await until(bob, "bob", "ann's direct message", items("inbox"), (i) => i.includes("ann: just for bob"));
  await until(ann, "ann", "her sent message", items("inbox"), (i) => i.includes("you to bob: just for bob"));
  for (const [who, p] of [
    ["ann", ann],
    ["bob", bob],
  ]) {
    const chat = await items("chat")(p);
    check(!chat.some((line) => line.includes("just for bob")), `${who}'s lobby shows the direct message: ${chat}`);
  }
  log("private: the direct message reached bob's inbox only");

  // Another user's private channel: the app's auth endpoint says no, and
  // pusher-js reports it.
  const refused = await ann.evaluate(
    () =>
      new Promise((resolve) => {
        const channel = pusher.subscribe("private-inbox-bob");
        channel.bind("pusher:subscription_succeeded", () => resolve("subscribed"));
        channel.bind("pusher:subscription_error", (error) => {
          pusher.unsubscribe("private-inbox-bob");
          resolve(error);
        });
      }),
  );
  check(refused && refused.status === 403, `bob's inbox refused to ann by the app: ${JSON.stringify(refused)}`);
  log("private: another user's inbox refused by the app's auth endpoint");

  // Webhooks: pushgate signed them, the app's SDK verified and kept them.
  await until(ann, "ann", "webhooks kept: channel_occupied, member_added for ann and bob", kept, (hooks) =>
    [
      hasHook("channel_occupied"),
      hasHook("member_added", { user_id: "ann" }),
      hasHook("member_added", { user_id: "bob" }),
    ].every((has) => has(hooks)),
  );
  // A webhook signed with another secret is refused and not kept.
  const forged = JSON.stringify({
    time_ms: Date.now(),
    events: [{ name: "member_added", channel: LOBBY, user_id: "mallory" }],
  });
  const forgedStatus = await ann.evaluate(
    ({ body, signature }) =>
      fetch("/pusher/webhook", {
        method: "POST",
        headers: { "content-type": "application/json", "x-pusher-key": "pusher-chat-key", "x-pusher-signature": signature },
        body,
      }).then((r) => r.status),
    { body: forged, signature: createHmac("sha256", "not-the-secret").update(forged).digest("hex") },
  );
  checkEqual(forgedStatus, 401, "a forged webhook's answer");
  check(!hasHook("member_added", { user_id: "mallory" })(await kept(ann)), "the forged webhook was kept");
  log("webhooks: channel_occupied and member_added verified by the app; a forged one refused");

  // bob leaves: gone from ann's page, and a member_removed webhook.
  await bob.context().close();
  await until(ann, "ann", "bob went offline", items("members"), (m) => m.join() === "ann (you)");
  await until(ann, "ann", "member_removed for bob kept", kept, hasHook("member_removed", { user_id: "bob" }));
  log("presence: bob left; member_removed verified by the app");

  checkEqual(pageErrors, [], "errors on the pages");
});
