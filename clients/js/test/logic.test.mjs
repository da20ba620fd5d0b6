// The client's pure logic: FNV-1a, the cursor codec, backoff, the
// close-code policy, and how calls (rpc, publish) wait for, use and lose a
// WebSocket, with a scripted WebSocket in place of a real one.
// Run: node --test clients/js/test/logic.test.mjs
// (tests/clients/client_js.rs runs it in `cargo test`).
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  TRANSPORTS,
  backoff,
  buildCursor,
  connect,
  fnv1a32,
  parseCursor,
  policy,
  retryDelay,
  statusCode,
} from "../pushgate.js";

test("FNV-1a 32 check values from docs/protocol.md", () => {
  assert.equal(fnv1a32(""), 0x811c9dc5);
  assert.equal(fnv1a32("a"), 0xe40c292c);
  assert.equal(fnv1a32("foobar"), 0xbf9cf968);
});

test("the worked example of docs/protocol.md", () => {
  const positions = [
    ["chat:1", { epoch: "AbCdEfGh", offset: 42 }],
    ["user:42", { epoch: "x9_K-2", offset: 0 }],
  ];
  const cursor = "1.6e3ac076.AbCdEfGh.16.2f6b7b82.x9_K-2.0.048abcb3";
  assert.equal(buildCursor(positions), cursor);
  assert.deepEqual([...parseCursor(cursor, ["chat:1", "user:42"])], positions);
});

test("a cursor with no channels", () => {
  assert.equal(buildCursor([]), "1.340ca71c");
  assert.equal(parseCursor("1.340ca71c", ["a"]).size, 0);
});

test("offsets are lowercase base 36 without leading zeros", () => {
  const cursor = buildCursor([["a", { epoch: "E", offset: 36 ** 3 }]]);
  assert.match(cursor, /^1\.e40c292c\.E\.1000\.[0-9a-f]{8}$/);
  assert.equal(parseCursor(cursor, ["a"]).get("a").offset, 36 ** 3);
  // The largest offset a JSON number carries exactly.
  const big = Number.MAX_SAFE_INTEGER;
  const back = parseCursor(buildCursor([["a", { epoch: "E", offset: big }]]), ["a"]);
  assert.equal(back.get("a").offset, big);
});

test("parsing names only the channels asked about", () => {
  const cursor = buildCursor([
    ["a", { epoch: "E1", offset: 1 }],
    ["b", { epoch: "E2", offset: 2 }],
  ]);
  assert.deepEqual([...parseCursor(cursor, ["b", "c"])], [["b", { epoch: "E2", offset: 2 }]]);
});

test("channels whose hashes collide each keep their own position", () => {
  // FNV-1a 32 of these two names is the same (0xf5e16c9a).
  const [a, b] = ["room:46wu", "room:bwfa"];
  assert.equal(fnv1a32(a), fnv1a32(b));
  const at = { [a]: { epoch: "A", offset: 7 }, [b]: { epoch: "B", offset: 9 } };
  const expected = "1.f5e16c9a.A.7.f5e16c9a.B.9";
  for (const order of [[a, b], [b, a], ["x", b, a]]) {
    const cursor = buildCursor(order.map((c) => [c, at[c] || { epoch: "X", offset: 1 }]));
    // pushgate writes them in name order, whatever order they were added in.
    assert.ok(cursor.includes(expected.slice(2)), cursor);
    const back = parseCursor(cursor, [b, a]);
    assert.deepEqual(back.get(a), at[a]);
    assert.deepEqual(back.get(b), at[b]);
  }
  // The cursor pushgate writes for them (src/cursor.rs, same rule).
  const fromServer = `${expected}.${fnv1a32(expected).toString(16).padStart(8, "0")}`;
  assert.deepEqual(parseCursor(fromServer, [a, b]).get(b), at[b]);
  // One entry for two channels of its hash: which is whose is unknown.
  const one = buildCursor([[a, at[a]]]);
  assert.equal(parseCursor(one, [a, b]).size, 0);
  assert.deepEqual(parseCursor(one, [a]).get(a), at[a]);
});

test("a damaged cursor is refused", () => {
  const cursor = buildCursor([["a", { epoch: "E1", offset: 5 }]]);
  // Every single-character change breaks the checksum or the shape.
  for (let i = 0; i < cursor.length; i++) {
    const changed = cursor.slice(0, i) + (cursor[i] == "0" ? "1" : "0") + cursor.slice(i + 1);
    assert.throws(() => parseCursor(changed, ["a"]), /bad cursor/, changed);
  }
  assert.throws(() => parseCursor("", ["a"]));
  assert.throws(() => parseCursor("2.340ca71c", ["a"]));
  assert.throws(() => parseCursor(cursor.slice(0, -1), ["a"]));
});

test("full jitter stays within [0, min(max, base * 2^attempt))", () => {
  const top = () => 1 - Number.EPSILON;
  assert.equal(backoff(0, 500, 30000, () => 0), 0);
  assert.ok(backoff(0, 500, 30000, top) < 500);
  assert.ok(backoff(3, 500, 30000, top) < 4000 && backoff(3, 500, 30000, top) > 3999);
  // The cap holds for any attempt, even past floating-point overflow.
  for (const attempt of [6, 7, 20, 2000]) {
    const delay = backoff(attempt, 500, 30000, top);
    assert.ok(delay <= 30000 && delay > 29999, `${attempt}: ${delay}`);
  }
  // Random draws cover the range rather than cluster.
  const draws = Array.from({ length: 2000 }, () => backoff(4, 100, 30000));
  assert.ok(Math.min(...draws) < 160 && Math.max(...draws) > 1440);
  assert.ok(draws.every((d) => d >= 0 && d < 1600));
});

test("retry delays per action", () => {
  const o = { minDelay: 500, maxDelay: 30000, slowDelay: 5000 };
  const top = () => 1 - Number.EPSILON;
  const bottom = () => 0;
  // 1001 and 4008: a short random pause, whatever came before.
  assert.ok(retryDelay("soon", 9, o, top) < 500);
  // 1013 and 4029: never shorter than half the slow base, and longer than
  // any first retry of an ordinary failure.
  assert.equal(retryDelay("slow", 0, o, bottom), 2500);
  assert.ok(retryDelay("slow", 0, o, bottom) > retryDelay("retry", 0, o, top));
  assert.equal(retryDelay("slow", 1, o, bottom), 5000);
  assert.ok(retryDelay("slow", 50, o, top) <= 30000);
  assert.ok(retryDelay("slow", 50, o, bottom) >= 15000);
  // Others: full jitter.
  assert.equal(retryDelay("retry", 2, o, bottom), 0);
  assert.ok(retryDelay("retry", 2, o, top) < 2000);
});

test("close-code policy (docs/protocol.md#close-codes)", () => {
  const expected = {
    1000: "retry",
    1001: "soon",
    1006: "retry",
    1008: "stop",
    1009: "retry",
    1011: "retry",
    1013: "slow",
    4000: "app",
    4001: "auth",
    4003: "stop",
    4008: "soon",
    4029: "slow",
    4042: "app",
    4999: "app",
  };
  for (const [code, action] of Object.entries(expected)) {
    assert.equal(policy(Number(code)), action, `close code ${code}`);
  }
});

test("HTTP refusals stand for close codes", () => {
  assert.equal(statusCode(401), 4001);
  assert.equal(statusCode(403), 4003);
  assert.equal(statusCode(429), 4029);
  assert.equal(statusCode(503), 1013);
  assert.equal(statusCode(400), 1008);
  assert.equal(statusCode(502), 1006);
  assert.equal(statusCode(504), 1006);
  assert.equal(policy(statusCode(400)), "stop");
  assert.equal(policy(statusCode(502)), "retry");
});

test("transports, most capable first", () => {
  assert.deepEqual(TRANSPORTS, ["websocket", "sse", "poll"]);
});

// A WebSocket the test drives: it records what the client sends, and opens,
// answers and closes when told to.
class ScriptedSocket {
  static made = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    ScriptedSocket.made.push(this);
  }
  send(text) {
    assert.equal(this.readyState, 1, "sent on an open socket only");
    this.sent.push(JSON.parse(text));
  }
  close() {
    this.readyState = 3;
  }
  open() {
    this.readyState = 1;
    this.onopen();
  }
  reply(message) {
    this.onmessage({ data: JSON.stringify(message) });
  }
  drop(code, reason = "") {
    this.readyState = 3;
    this.onclose({ code, reason });
  }
  calls() {
    return this.sent.filter((c) => c.op == "rpc" || c.op == "publish");
  }
}

/** A client on scripted sockets; `latest()` is the newest socket. */
function scripted(options = {}) {
  globalThis.WebSocket = ScriptedSocket;
  ScriptedSocket.made = [];
  const client = connect("http://pushgate.test/realtime", { minDelay: 1, maxDelay: 1, ...options });
  return { client, latest: () => ScriptedSocket.made[ScriptedSocket.made.length - 1] };
}

/** Waits until `check()` is truthy (a few event-loop turns at most). */
async function settled(check, what) {
  for (let i = 0; i < 200 && !check(); i++) await new Promise((resolve) => setTimeout(resolve, 1));
  assert.ok(check(), `waited for ${what}`);
}

/** The error a promise rejected with (fails if it resolved). */
async function rejection(promise) {
  try {
    assert.fail(`resolved to ${JSON.stringify(await promise)}`);
  } catch (error) {
    return error;
  }
}

test("calls wait for the WebSocket to open, and replies settle them by id in any order", async () => {
  const { client, latest } = scripted();
  // No channel yet: a call opens the connection itself.
  const liked = client.rpc("like", { post: 12 });
  const published = client.publish("chat:1", { text: "hi" }, { event: "msg" });
  const plain = client.publish("chat:1", "x");
  await settled(latest, "a socket");
  const ws = latest();
  assert.equal(ws.url, "ws://pushgate.test/realtime/ws");
  assert.deepEqual(ws.sent, [], "nothing is sent before the socket is open");
  ws.open();
  const [like, msg, x] = ws.calls();
  assert.deepEqual(like, { id: like.id, op: "rpc", method: "like", data: { post: 12 } });
  assert.deepEqual(msg, { id: msg.id, op: "publish", channel: "chat:1", data: { text: "hi" }, event: "msg" });
  assert.deepEqual(x, { id: x.id, op: "publish", channel: "chat:1", data: "x" });
  assert.equal(new Set([like.id, msg.id, x.id]).size, 3, "distinct ids");

  // Out of order; each reply goes to its own call.
  ws.reply({ id: x.id, error: { code: "publish_not_allowed", message: "no rule lets clients publish here" } });
  ws.reply({ id: msg.id, result: { epoch: "E", offset: 43 } });
  ws.reply({ id: like.id, result: { likes: 31 } });
  assert.deepEqual(await liked, { likes: 31 });
  assert.deepEqual(await published, { epoch: "E", offset: 43 });
  const error = await rejection(plain);
  assert.ok(error instanceof Error);
  assert.equal(error.code, "publish_not_allowed");
  assert.equal(error.message, "no rule lets clients publish here");

  // Once open, a call goes at once; a null result is a result.
  const later = client.rpc("ping");
  const [call] = ws.calls().slice(3);
  assert.deepEqual(call, { id: call.id, op: "rpc", method: "ping" });
  ws.reply({ id: call.id, result: null });
  assert.equal(await later, null);
  // Options may be left out, or null.
  const bare = client.publish("chat:1", 0, null);
  const [sent] = ws.calls().slice(4);
  assert.deepEqual(sent, { id: sent.id, op: "publish", channel: "chat:1", data: 0 });
  ws.reply({ id: sent.id, result: { epoch: "E", offset: 44 } });
  assert.deepEqual(await bare, { epoch: "E", offset: 44 });
  client.close();
});

test("a call sent on a connection that ends is rejected, not sent again; queued ones wait for the next", async () => {
  const { client, latest } = scripted();
  const got = [];
  client.subscribe("chat:1", (data) => got.push(data));
  await settled(latest, "a socket");
  const first = latest();
  first.open();
  const subscribe = first.sent.find((c) => c.op == "subscribe");
  first.reply({ id: subscribe.id, result: { recovered: true, epoch: "E", offset: 5 } });
  const lost = client.rpc("slow");
  first.drop(1006);
  const error = await rejection(lost);
  assert.equal(error.code, "disconnected");
  assert.equal(client.state, "disconnected");

  // Made while disconnected: waits, then goes on the next socket, which
  // resumes the subscription as before.
  const queued = client.rpc("later");
  await settled(() => latest() != first, "a reconnect");
  const second = latest();
  second.open();
  assert.deepEqual(second.sent.find((c) => c.op == "subscribe"), { id: 1, op: "subscribe", channel: "chat:1", since: "E:5" });
  assert.deepEqual(second.calls().map((c) => c.method), ["later"], "the lost call is not sent again");
  second.reply({ id: second.calls()[0].id, result: "done" });
  assert.equal(await queued, "done");
  // A reply to a subscribe is still a subscribe's reply, and messages flow.
  second.reply({ channel: "chat:1", epoch: "E", offset: 6, data: "m", user: "42" });
  assert.deepEqual(got, ["m"]);

  // reconnect() ends the connection too.
  const again = client.rpc("x");
  client.reconnect();
  assert.equal((await rejection(again)).code, "disconnected");
  // close() refuses what waits, and every later call.
  const waiting = client.rpc("y");
  client.close();
  assert.equal((await rejection(waiting)).code, "closed");
  assert.equal((await rejection(client.rpc("z"))).code, "closed");
});

test("calls need the WebSocket: refused at once without one", async () => {
  const { client } = scripted({ transports: ["sse", "poll"] });
  const error = await rejection(client.publish("chat:1", 1));
  assert.equal(error.code, "needs_websocket");
  assert.match(error.message, /sse/);
  client.close();
});

test("queued calls are refused when the client falls back to SSE", async () => {
  const realFetch = globalThis.fetch;
  // pushgate answers long-poll (the probe) while the WebSocket never opens;
  // the SSE stream that follows never answers.
  globalThis.fetch = async (url) =>
    String(url).includes("/poll")
      ? new Response(JSON.stringify({ messages: [], cursor: buildCursor([]), reset: [] }))
      : new Promise(() => {});
  try {
    const { client, latest } = scripted();
    const fallbacks = [];
    client.on("fallback", (f) => fallbacks.push(f.transport));
    client.subscribe("chat:1");
    const waiting = client.rpc("who");
    await settled(latest, "a socket");
    latest().drop(1006);
    await settled(() => ScriptedSocket.made.length == 2, "a second try");
    latest().drop(1006);
    const error = await rejection(waiting);
    assert.equal(error.code, "needs_websocket");
    assert.deepEqual(fallbacks, ["sse"]);
    assert.equal((await rejection(client.rpc("who"))).code, "needs_websocket");
    client.close();
  } finally {
    globalThis.fetch = realFetch;
  }
});

test("calls waiting for a connection are bounded in number and in time", async () => {
  const { client, latest } = scripted({ maxQueued: 2, callTimeout: 30 });
  const waiting = [client.rpc("a"), client.rpc("b")];
  const refused = await rejection(client.rpc("c"));
  assert.equal(refused.code, "queue_full");
  for (const call of waiting) assert.equal((await rejection(call)).code, "timeout");
  // The socket that opens late sends nothing that timed out.
  latest().open();
  assert.deepEqual(latest().calls(), []);
  // Sent but unanswered: the same bound, and a late reply changes nothing.
  const sent = client.rpc("d");
  const [call] = latest().calls();
  const error = await rejection(sent);
  assert.equal(error.code, "timeout");
  assert.match(error.message, /publish may still/);
  latest().reply({ id: call.id, result: "late" });
  client.close();
});

test("data that is not JSON is refused before anything is sent", async () => {
  const { client } = scripted();
  const error = await rejection(client.rpc("x", { n: 1n }));
  assert.equal(error.code, "bad_json");
  assert.equal(client.state, "idle");
  client.close();
});

test("an ephemeral publication is handed on and leaves the resume position alone", async () => {
  const { client, latest } = scripted();
  const heard = [];
  client.subscribe("typing:1", (data, envelope) => heard.push([data, envelope]));
  await settled(latest, "a socket");
  const ws = latest();
  ws.open();
  const [subscribe] = ws.sent.filter((c) => c.op == "subscribe");
  ws.reply({ id: subscribe.id, result: { recovered: true, epoch: "E", offset: 4 } });
  ws.reply({ channel: "typing:1", epoch: "E", offset: 5, data: "stored" });
  ws.reply({ channel: "typing:1", event: "typing", user: "ada", data: { on: true } });
  assert.deepEqual(
    heard.map(([data]) => data),
    ["stored", { on: true }]
  );
  assert.equal(heard[1][1].user, "ada");
  // Resuming asks for what follows the last stored publication.
  ws.drop(1006);
  await settled(() => latest() != ws, "a new socket");
  latest().open();
  const [again] = latest().sent.filter((c) => c.op == "subscribe");
  assert.equal(again.since, "E:5");
  client.close();
});
