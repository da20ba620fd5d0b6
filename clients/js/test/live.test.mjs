// The client against real pushgate servers: positions and resume on each
// transport, the cursor it builds, resets, what it does on 4001, 4029,
// 4000 and 4008, and rpc and publish against a real app. tests/clients/client_js.rs starts the servers and runs this file
// with `node --experimental-websocket --test` (Node 20 has WebSocket behind
// that flag; fetch streams SSE).
//
// Environment: PUSHGATE_PUBLIC, PUSHGATE_API, PUSHGATE_KEY: a node on the
// memory engine with `auth.mode: none` and `history.size: 5`;
// PUSHGATE_JWT_PUBLIC, PUSHGATE_JWT_API, PUSHGATE_JWT_SECRET: a node in JWT
// mode (HS256, no leeway) with `limits.connections_per_user: 1`;
// PUSHGATE_CALLS_PUBLIC, PUSHGATE_CALLS_API: a node in the same JWT mode in
// front of a real app (CallsApp in tests/clients/client_js.rs) that answers
// rpc methods `whoami`, `refuse`, `wait`/`waiting`/`release` (by
// `data.key`), whose rules let clients publish on `room:` and `secret:`.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { createHmac, randomUUID } from "node:crypto";

import { connect } from "../pushgate.js";

const env = (name) => {
  const value = process.env[name];
  assert.ok(value, `${name} is not set: run this file through tests/clients/client_js.rs`);
  return value;
};
const PUBLIC = env("PUSHGATE_PUBLIC");
const API = env("PUSHGATE_API");
const KEY = env("PUSHGATE_KEY");
const JWT_PUBLIC = env("PUSHGATE_JWT_PUBLIC");
const JWT_API = env("PUSHGATE_JWT_API");
const JWT_SECRET = env("PUSHGATE_JWT_SECRET");
const CALLS_PUBLIC = env("PUSHGATE_CALLS_PUBLIC");
const CALLS_API = env("PUSHGATE_CALLS_API");

/** How long any one thing may take to happen. */
const PATIENCE = 15000;

const clients = [];
after(() => clients.forEach((c) => c.close()));

function open(base, options) {
  const client = connect(`${base}/realtime`, { minDelay: 50, maxDelay: 500, slowDelay: 400, ...options });
  clients.push(client);
  const states = [];
  client.on("state", (s) => states.push(s));
  return { client, states };
}

/** Waits until `check()` is truthy, or fails naming `what` at the deadline. */
async function until(check, what, ms = PATIENCE) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

async function api(base, path, body, key = KEY) {
  const res = await fetch(`${base}${path}`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const json = await res.json();
  assert.equal(res.status, 200, JSON.stringify(json));
  return json;
}

const publish = (channel, data, extra = {}) => api(API, "/api/publish", { channel, data, ...extra });
const unique = (name) => `${name}:${randomUUID().slice(0, 8)}`;

function jwt(claims) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${head}.${createHmac("sha256", JWT_SECRET).update(head).digest("base64url")}`;
}

const token = (user, channels, seconds) =>
  jwt({ sub: user, channels, exp: Math.floor(Date.now() / 1000) + seconds });

test("websocket: delivers in order, and a new client resumes from the positions", async () => {
  const channel = unique("ws");
  const { client } = open(PUBLIC, { transports: ["websocket"] });
  const got = [];
  client.subscribe(channel, (data) => got.push(data.n));
  await until(() => client.position(channel), "the subscribe reply");
  for (const n of [1, 2, 3]) await publish(channel, { n });
  await until(() => got.length == 3, "three publications");
  assert.deepEqual(got, [1, 2, 3]);
  const position = client.position(channel);
  assert.match(position, /^[A-Za-z0-9_-]+:3$/);
  client.close();

  // Published while nobody listens: the next client resumes from the saved
  // position and gets them once, then live ones.
  for (const n of [4, 5]) await publish(channel, { n });
  const again = open(PUBLIC, { transports: ["websocket"], positions: { [channel]: position } }).client;
  const resumed = [];
  again.subscribe(channel, (data) => resumed.push(data.n));
  await until(() => resumed.length == 2, "the two missed publications");
  await publish(channel, { n: 6 });
  await until(() => resumed.length == 3, "a live publication");
  assert.deepEqual(resumed, [4, 5, 6]);
  assert.equal(again.position(channel), position.replace(/:3$/, ":6"));
});

test("long-poll: the client's cursor is the one pushgate writes", async () => {
  const [a, b] = [unique("poll-a"), unique("poll-b")];
  const { client, states } = open(PUBLIC, { transports: ["poll"], pollTimeout: 2 });
  const got = [];
  client.subscribe(a, (data, envelope) => got.push([envelope.channel, data]));
  client.subscribe(b, (data, envelope) => got.push([envelope.channel, data]));
  await until(() => client.position(a) && client.position(b), "positions from the first poll");
  assert.ok(states.some((s) => s.state == "connected" && s.transport == "poll"));
  await publish(a, "x");
  await publish(b, "y");
  await publish(a, "z");
  await until(() => got.length == 3, "three publications");
  // Long-poll keeps order within a channel; a batch that catches up on
  // two channels gives each channel's history in turn.
  assert.deepEqual(got.filter(([channel]) => channel == a), [[a, "x"], [a, "z"]]);
  assert.deepEqual(got.filter(([channel]) => channel == b), [[b, "y"]]);

  // pushgate takes the client's cursor, has nothing newer, and answers with
  // the very same cursor.
  const query = new URLSearchParams([["channel", a], ["channel", b], ["since", client.cursor()], ["timeout", "0"]]);
  const res = await fetch(`${PUBLIC}/realtime/poll?${query}`);
  const body = await res.json();
  assert.equal(res.status, 200, JSON.stringify(body));
  assert.deepEqual(body.messages, []);
  assert.equal(body.cursor, client.cursor());
});

test("sse: delivers named events too, and reopens without loss when a channel is added", async () => {
  const [a, b] = [unique("sse-a"), unique("sse-b")];
  const { client, states } = open(PUBLIC, { transports: ["sse"] });
  const got = [];
  client.subscribe(a, (data, envelope) => got.push(`${envelope.event || "-"}:${data}`));
  await until(() => client.position(a) && client.state == "connected", "the stream");
  await publish(a, "plain");
  await publish(a, "named", { event: "chat.created" });
  await until(() => got.length == 2, "two publications");
  assert.deepEqual(got, ["-:plain", "chat.created:named"]);

  client.subscribe(b, (data) => got.push(`b:${data}`));
  // Published while the stream reopens: resumed from the positions.
  await publish(a, "during");
  await until(() => client.position(b), "the new channel's position");
  await publish(b, "new");
  await until(() => got.length == 4, "the publication made during the reopening and the new channel's");
  assert.deepEqual(got.slice(2).sort(), ["-:during", "b:new"]);
  assert.ok(states.every((s) => s.transport == "sse"));

  // Leaving every channel closes the stream; a new channel opens it again.
  client.unsubscribe(a);
  client.unsubscribe(b);
  assert.equal(client.state, "idle");
  const c = unique("sse-c");
  client.subscribe(c, (data) => got.push(`c:${data}`));
  await until(() => client.state == "connected" && client.position(c), "the stream again");
  await publish(c, "back");
  await until(() => got.length == 5, "a publication on the new stream");
  assert.equal(got[4], "c:back");
  assert.ok(!states.some((s) => s.state == "closed" || s.state == "disconnected"), JSON.stringify(states));
});

test("a gap history cannot cover is a reset event", async () => {
  const channel = unique("reset");
  const { client } = open(PUBLIC, { transports: ["websocket"] });
  client.subscribe(channel);
  await until(() => client.position(channel), "the subscribe reply");
  await publish(channel, 1);
  await until(() => client.position(channel).endsWith(":1"), "the first publication");
  const position = client.position(channel);
  client.close();
  // history.size is 5: ten more leave a gap it cannot cover.
  for (let n = 2; n <= 11; n++) await publish(channel, n);

  const again = open(PUBLIC, { transports: ["websocket"], positions: { [channel]: position } }).client;
  const events = [];
  again.on("reset", (reset) => events.push(["reset", reset]));
  again.subscribe(channel, (n) => events.push(["message", n]));
  await until(() => events.length, "the reset");
  const [kind, reset] = events[0];
  assert.equal(kind, "reset");
  assert.deepEqual(reset, { channel, epoch: position.split(":")[0], offset: 11 });
  await publish(channel, 12);
  await until(() => events.some(([k, n]) => k == "message" && n == 12), "a live publication");
  assert.deepEqual(events.slice(1), [["message", 12]]);
});

test("4001: reconnects only with new credentials, and resumes", async () => {
  const channel = unique("jwt");
  const user = unique("u");
  let calls = 0;
  // The first token runs out within two seconds; the next lasts.
  const getToken = () => token(user, [channel], ++calls == 1 ? 2 : 600);
  const { client, states } = open(JWT_PUBLIC, { transports: ["websocket"], getToken });
  const got = [];
  client.subscribe(channel, (n) => got.push(n));
  await until(() => client.position(channel), "the subscribe reply");
  await api(JWT_API, "/api/publish", { channel, data: 1 });
  await until(() => got.length == 1, "the first publication");
  await until(() => states.some((s) => s.code == 4001), "the close at the token's expiry");
  await until(() => client.state == "connected" && calls == 2, "a reconnect with the new token");
  await api(JWT_API, "/api/publish", { channel, data: 2 });
  await until(() => got.length == 2, "a publication after the reconnect");
  assert.deepEqual(got, [1, 2]);
  client.close();

  // The same expired credentials again: no retry, the client stops.
  const stale = token(unique("u"), [channel], 1);
  let asked = 0;
  const stuck = open(JWT_PUBLIC, { transports: ["websocket"], getToken: () => (asked++, stale) });
  stuck.client.subscribe(channel);
  await until(() => stuck.client.state == "closed", "the client to give up");
  const last = stuck.states[stuck.states.length - 1];
  assert.equal(last.code, 4001);
  assert.equal(asked, 2, "asked once to connect and once after the 4001");
  assert.equal(stuck.states.filter((s) => s.state == "connecting").length, 1);

  // onAuthExpired may hand over a token when getToken has none new.
  const rescued = open(JWT_PUBLIC, {
    transports: ["websocket"],
    getToken: () => stale,
    onAuthExpired: () => token(unique("u"), [channel], 600),
  });
  rescued.client.subscribe(channel);
  await until(
    () => rescued.states.some((s) => s.code == 4001) && rescued.client.state == "connected",
    "a reconnect with the token onAuthExpired gave",
  );
});

test("4029: a longer backoff, then in", async () => {
  const channel = unique("limit");
  const user = unique("u");
  const getToken = () => token(user, [channel], 600);
  const first = open(JWT_PUBLIC, { transports: ["websocket"], getToken }).client;
  first.subscribe(channel);
  await until(() => first.state == "connected", "the first connection");
  // limits.connections_per_user is 1: the second is refused with 4029.
  const second = open(JWT_PUBLIC, { transports: ["websocket"], getToken, slowDelay: 400 });
  second.client.subscribe(channel);
  const refused = await until(() => second.states.find((s) => s.code == 4029), "the 4029");
  assert.equal(refused.state, "disconnected");
  assert.ok(refused.delay >= 200 && refused.delay <= 500, `slow delay ${refused.delay}`);
  first.close();
  await until(() => second.client.state == "connected" && second.client.position(channel), "the second connection");
});

test("4000 follows the app's reason; 4008 resumes; SSE gets the same from pushgate.disconnect", async () => {
  for (const transport of ["websocket", "sse"]) {
    const channel = unique("bye");
    const user = unique("u");
    const getToken = () => token(user, [channel], 600);
    const { client, states } = open(JWT_PUBLIC, { transports: [transport], getToken });
    const got = [];
    client.subscribe(channel, (n) => got.push(n));
    await until(() => client.state == "connected" && client.position(channel), `${transport}: connected`);
    const disconnect = (code, reason) => api(JWT_API, "/api/disconnect", { user, code, reason });
    const reconnected = () => states.filter((s) => s.state == "connected").length;

    await disconnect(4008, "slow consumer");
    await until(() => states.some((s) => s.code == 4008), `${transport}: the 4008`);
    await until(() => reconnected() == 2, `${transport}: the reconnect after 4008`);
    await disconnect(4000, "reconnect: the app moved you");
    await until(() => reconnected() == 3, `${transport}: the reconnect the reason asked for`);
    await api(JWT_API, "/api/publish", { channel, data: "still here" });
    await until(() => got.length == 1, `${transport}: a publication after the reconnects`);
    await disconnect(4000, "logged out");
    await until(() => client.state == "closed", `${transport}: the stop the reason asked for`);
    assert.deepEqual(states[states.length - 1], { state: "closed", transport, code: 4000, reason: "logged out" });
  }
});

/** A client of the node in front of the calls app, as `user`, granted `room:*` and `news:*`. */
const caller = (user, options) =>
  open(CALLS_PUBLIC, { getToken: () => token(user, ["room:*", "news:*"], 600), ...options });

/** The error a promise rejected with (fails if it resolved). */
async function rejection(promise) {
  try {
    assert.fail(`resolved to ${JSON.stringify(await promise)}`);
  } catch (error) {
    return error;
  }
}

test("rpc: the app's answer as the connection's user, its refusals, and replies out of order", async () => {
  const user = unique("u");
  const { client, states } = caller(user);
  // No channel: the call opens the WebSocket itself.
  const data = { n: 1.5, nested: [true, null, "x"] };
  assert.deepEqual(await client.rpc("whoami", data), { user, data });
  assert.equal(client.state, "connected");
  assert.equal(client.transport, "websocket");

  const refused = await rejection(client.rpc("refuse"));
  assert.ok(refused instanceof Error);
  assert.equal(refused.code, "not_yours");
  assert.equal(refused.message, "that is not yours");
  assert.equal((await rejection(client.rpc("no_such_method"))).code, "app_refused");
  assert.equal((await rejection(client.rpc("bad method!"))).code, "bad_method");

  // The first call waits in the app until the second releases it: the
  // second's reply comes first, and each settles its own promise.
  const key = unique("k");
  const settled = [];
  const held = client.rpc("wait", { key }).then((result) => settled.push(["wait", result]));
  await until(async () => await client.rpc("waiting", { key }), "the app holding the first call");
  settled.push(["release", await client.rpc("release", { key })]);
  await held;
  assert.deepEqual(settled, [
    ["release", "released"],
    ["wait", "waited"],
  ]);
  assert.ok(!states.some((s) => s.state == "disconnected"), JSON.stringify(states));
});

test("publish: stored, heard by every subscriber with the publisher's user; refused where no rule or grant allows", async () => {
  const room = unique("room");
  const [alice, bob] = [unique("alice"), unique("bob")];
  const heard = { [alice]: [], [bob]: [] };
  const clients = {};
  for (const user of [alice, bob]) {
    clients[user] = caller(user).client;
    clients[user].subscribe(room, (data, envelope) => heard[user].push(envelope));
  }
  await until(() => clients[alice].position(room) && clients[bob].position(room), "both subscriptions");

  const stored = await clients[alice].publish(room, { text: "hi" }, { event: "msg" });
  assert.deepEqual(Object.keys(stored).sort(), ["epoch", "offset"]);
  assert.equal(stored.offset, 1);
  const plain = await clients[bob].publish(room, 2);
  assert.deepEqual(plain, { epoch: stored.epoch, offset: 2 });
  await until(() => heard[alice].length == 2 && heard[bob].length == 2, "both publications at both clients");
  for (const user of [alice, bob]) {
    assert.deepEqual(heard[user], [
      { channel: room, epoch: stored.epoch, offset: 1, event: "msg", user: alice, data: { text: "hi" } },
      { channel: room, epoch: stored.epoch, offset: 2, user: bob, data: 2 },
    ]);
  }

  // Stored in history like any publication.
  const res = await fetch(`${CALLS_API}/api/history?channel=${room}`, { headers: { authorization: `Bearer ${KEY}` } });
  const history = await res.json();
  assert.deepEqual(history.messages.map((m) => m.data), [{ text: "hi" }, 2]);

  // Granted but no rule lets clients publish; a rule but no grant; a bad event.
  const denied = await rejection(clients[alice].publish(unique("news"), 1));
  assert.equal(denied.code, "publish_not_allowed");
  assert.equal((await rejection(clients[alice].publish(unique("secret"), 1))).code, "forbidden");
  assert.equal((await rejection(clients[alice].publish(room, 1, { event: "no spaces" }))).code, "bad_event");
});

test("calls need the WebSocket, and one under way at a disconnect is rejected while the next goes on the new connection", async () => {
  const user = unique("u");
  const sse = caller(user, { transports: ["sse"] }).client;
  sse.subscribe(unique("room"));
  await until(() => sse.state == "connected", "the SSE stream");
  const error = await rejection(sse.rpc("whoami"));
  assert.equal(error.code, "needs_websocket");
  sse.close();

  const { client, states } = caller(user);
  const room = unique("room");
  const got = [];
  client.subscribe(room, (data) => got.push(data));
  await until(() => client.position(room), "the subscription");
  const key = unique("k");
  const held = client.rpc("wait", { key });
  // Watched from now: the close can reach the client before the API's
  // answer does, and a rejection nobody watches yet is a test failure.
  const losing = rejection(held);
  await until(async () => await client.rpc("waiting", { key }), "the app holding the call");
  await api(CALLS_API, "/api/disconnect", { user, code: 4008, reason: "slow consumer" });
  const lost = await losing;
  assert.equal(lost.code, "disconnected");
  // Made at once: waits for the reconnect, then goes on the new connection.
  const stored = await client.publish(room, "after");
  assert.equal(states.filter((s) => s.state == "connected").length, 2);
  await until(() => got.length == 1, "the publication made after the reconnect");
  assert.deepEqual(got, ["after"]);
  assert.equal(client.position(room), `${stored.epoch}:${stored.offset}`);
  await client.rpc("release", { key });
});
