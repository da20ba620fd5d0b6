// The client's pure logic: FNV-1a, the cursor codec, backoff and the
// close-code policy. Run: node --test clients/js/test/logic.test.mjs
// (tests/clients/client_js.rs runs it in `cargo test`).
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  TRANSPORTS,
  backoff,
  buildCursor,
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
