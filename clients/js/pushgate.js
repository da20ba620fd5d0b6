// pushgate's browser client: one ES module, no dependencies, no build step.
// Guide: docs/client.md. Wire protocol: docs/protocol.md. Types: pushgate.d.ts.
//
// It keeps each channel's position (epoch and offset of the last publication
// delivered), so after any reconnect, on any transport, it resumes with
// `since` (WebSocket) or a cursor built from those positions (SSE,
// long-poll): nothing is missed while history covers the gap, nothing is
// delivered twice, and a `reset` event says when history could not cover it.
//
// Calls (`rpc`, `publish`) need the WebSocket: they wait, bounded in number
// and time, for one to be open, and are answered by id, in any order. A call
// sent on a connection that then ends is never answered (pushgate forgets it
// with the connection), so it is rejected then, never sent again.

/** The transports, most capable first. */
export const TRANSPORTS = ["websocket", "sse", "poll"];

// The transport a fallback settled on, for every client of this page: a
// proxy that blocks WebSocket for one connection blocks it for the next.
let remembered;

/** FNV-1a 32 of an ASCII string (channel names and cursors are ASCII). */
export function fnv1a32(text) {
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    hash = Math.imul(hash ^ text.charCodeAt(i), 0x01000193) >>> 0;
  }
  return hash;
}

const hex8 = (n) => n.toString(16).padStart(8, "0");

/**
 * A version-1 cursor (docs/protocol.md#cursors) from positions:
 * an iterable of [channel, {epoch, offset}]. Channels whose names hash
 * alike are written together, in the order of their names, which is how
 * pushgate tells them apart.
 */
export function buildCursor(positions) {
  const groups = new Map();
  for (const [channel, position] of positions) {
    const hash = hex8(fnv1a32(channel));
    if (!groups.has(hash)) groups.set(hash, []);
    groups.get(hash).push([channel, position]);
  }
  let text = "1";
  for (const [hash, group] of groups) {
    group.sort(([a], [b]) => (a < b ? -1 : 1));
    for (const [, { epoch, offset }] of group) {
      text += `.${hash}.${epoch}.${offset.toString(36)}`;
    }
  }
  return `${text}.${hex8(fnv1a32(text))}`;
}

/**
 * The positions a cursor holds for `channels`: a Map channel ->
 * {epoch, offset}. Entries sharing a hash go, in order, to the channels of
 * that hash in the order of their names; when their numbers differ nothing
 * can be told apart and those channels are left out (pushgate resets them).
 * Throws on a malformed cursor or a bad checksum.
 */
export function parseCursor(text, channels) {
  const fields = text.split(".");
  const cut = text.lastIndexOf(".");
  if (fields[0] != "1" || fields.length % 3 != 2 || hex8(fnv1a32(text.slice(0, cut))) != fields[fields.length - 1]) {
    throw new Error("bad cursor");
  }
  const held = new Map();
  for (let i = 1; i < fields.length - 1; i += 3) {
    if (!held.has(fields[i])) held.set(fields[i], []);
    held.get(fields[i]).push({ epoch: fields[i + 1], offset: parseInt(fields[i + 2], 36) });
  }
  const named = new Map();
  for (const channel of new Set(channels)) {
    const hash = hex8(fnv1a32(channel));
    if (!named.has(hash)) named.set(hash, []);
    named.get(hash).push(channel);
  }
  const out = new Map();
  for (const [hash, names] of named) {
    const entries = held.get(hash) || [];
    if (entries.length != names.length) continue;
    names.sort();
    names.forEach((channel, k) => out.set(channel, entries[k]));
  }
  return out;
}

/**
 * Exponential backoff with full jitter: a random delay in
 * [0, min(max, base * 2^attempt)).
 */
export function backoff(attempt, base, max, random = Math.random) {
  return random() * Math.min(max, base * 2 ** attempt);
}

/**
 * How long to wait before reconnecting after `action` (see `policy`), on
 * the `attempt`-th retry in a row: "soon" within `minDelay`; "slow" between
 * half and all of min(maxDelay, slowDelay * 2^attempt); otherwise full
 * jitter on min(maxDelay, minDelay * 2^attempt).
 */
export function retryDelay(action, attempt, o, random = Math.random) {
  if (action == "soon") return random() * o.minDelay;
  if (action == "slow") {
    const cap = Math.min(o.maxDelay, o.slowDelay * 2 ** attempt);
    return (cap + random() * cap) / 2;
  }
  return backoff(attempt, o.minDelay, o.maxDelay, random);
}

/**
 * What to do after a connection ended with a WebSocket close `code`
 * (docs/protocol.md#close-codes): "soon" (reconnect after a short random
 * pause and resume), "retry" (reconnect with backoff), "slow" (with a longer
 * backoff), "auth" (only with new credentials), "stop", or "app" (the app
 * disconnected us: its reason decides).
 */
export function policy(code) {
  if (code == 1001 || code == 4008) return "soon";
  if (code == 1013 || code == 4029) return "slow";
  if (code == 4001) return "auth";
  if (code == 4003 || code == 1008) return "stop";
  if (code >= 4000 && code < 5000) return "app";
  return "retry";
}

/** The close code an HTTP refusal of SSE or long-poll stands for. */
export function statusCode(status) {
  return { 400: 1008, 401: 4001, 403: 4003, 404: 1008, 429: 4029, 503: 1013 }[status] || 1006;
}

/**
 * Opens a client on pushgate's realtime endpoints at `url` (its
 * `realtime.prefix`, "/realtime" by default). It connects once there is a
 * channel to hear.
 */
export function connect(url = "/realtime", options = {}) {
  const o = {
    transports: TRANSPORTS,
    minDelay: 500,
    maxDelay: 30000,
    slowDelay: 5000,
    healthyAfter: 5000,
    pollTimeout: 25,
    tokenParam: "token",
    callTimeout: 15000,
    maxQueued: 100,
    ...options,
  };
  const g = globalThis;
  const root = new URL(url, g.location && g.location.href).href.replace(/\/$/, "");
  const available = o.transports.filter((t) => (t == "websocket" ? g.WebSocket : g.fetch));
  // channel -> {h: Set of handlers, p: {epoch, offset} | undefined}
  const subs = new Map();
  const listeners = {};
  let index = Math.max(0, available.indexOf(remembered));
  let state = "idle";
  let attempt = 0;
  let blocked = 0; // pre-open failures in a row while pushgate answered
  let conn; // the live connection: {close(), add(channel), drop(channel)}
  let timer;
  let healthy;
  let token;
  let closed;
  // Calls not yet answered: {command, ok, no, timer, on}, `on` being the
  // connection a call was sent on (unset while it waits for one).
  const calls = new Set();

  const client = {
    get state() {
      return state;
    },
    get transport() {
      return available[index];
    },
    subscribe(channel, handler) {
      let sub = subs.get(channel);
      if (!sub) {
        const since = o.positions && o.positions[channel];
        const colon = since ? since.lastIndexOf(":") : -1;
        sub = { h: new Set(), p: colon > 0 ? { epoch: since.slice(0, colon), offset: +since.slice(colon + 1) } : undefined };
        subs.set(channel, sub);
        conn ? conn.add(channel) : state == "idle" && start();
      }
      if (handler) sub.h.add(handler);
      return {
        unsubscribe() {
          sub.h.delete(handler);
          if (!sub.h.size && subs.get(channel) == sub) client.unsubscribe(channel);
        },
      };
    },
    unsubscribe(channel) {
      if (subs.delete(channel) && conn) conn.drop(channel);
    },
    on(event, fn) {
      (listeners[event] ||= new Set()).add(fn);
      return () => listeners[event].delete(fn);
    },
    position(channel) {
      const p = subs.get(channel) && subs.get(channel).p;
      return p && `${p.epoch}:${p.offset}`;
    },
    cursor: () => buildCursor(known()),
    rpc: (method, data) => request({ op: "rpc", method, data }),
    publish: (channel, data, options) => request({ op: "publish", channel, data, event: (options || {}).event }),
    reconnect() {
      if (closed) return;
      attempt = 0;
      start();
    },
    close() {
      closed = 1;
      refuseAll("closed", "the client was closed");
      stop();
      setState("closed", { code: 1000, reason: "closed by the page" });
      g.removeEventListener && (g.removeEventListener("online", online), g.removeEventListener("offline", offline));
    },
  };

  function emit(event, value) {
    for (const fn of listeners[event] || []) call(fn, value);
  }

  // A throwing handler must not break delivery to the others.
  function call(fn, ...args) {
    try {
      fn(...args);
    } catch (error) {
      setTimeout(() => {
        throw error;
      });
    }
  }

  // A call: sent at once on an open WebSocket, else queued for the next one.
  function request(command) {
    return new Promise((ok, no) => {
      const r = { command, ok, no };
      try {
        JSON.stringify(command);
      } catch (error) {
        return refuse(r, "bad_json", String(error));
      }
      if (closed) return refuse(r, "closed", "the client is closed");
      if (available[index] != "websocket") return refuse(r, "needs_websocket", needsWebSocket());
      if ([...calls].filter((q) => !q.on).length >= o.maxQueued) {
        return refuse(r, "queue_full", `${o.maxQueued} calls already wait for a connection`);
      }
      calls.add(r);
      r.timer = setTimeout(
        () =>
          refuse(r, "timeout", r.on ? "no reply in time (a publish may still have been made)" : "no connection in time"),
        o.callTimeout,
      );
      conn && conn.call ? conn.call(r) : state == "idle" && start();
    });
  }

  // A call's reply (one that timed out meanwhile is already settled).
  function answer(r, m) {
    if (!calls.has(r)) return;
    if (m.error) return refuse(r, m.error.code, m.error.message);
    clearTimeout(r.timer);
    calls.delete(r);
    r.ok(m.result);
  }

  function refuse(r, code, message) {
    clearTimeout(r.timer);
    calls.delete(r);
    r.no(Object.assign(new Error(message), { code }));
  }

  // Refuses every call (`on` given: those sent on that connection).
  function refuseAll(code, message, on) {
    for (const r of calls) if (!on || r.on == on) refuse(r, code, message);
  }

  const needsWebSocket = () => `rpc and publish need the WebSocket; this client uses ${available[index] || "no transport"}`;

  function setState(next, detail) {
    state = next;
    emit("state", { state, transport: available[index], ...detail });
  }

  function* known() {
    for (const [channel, sub] of subs) if (sub.p) yield [channel, sub.p];
  }

  function endpoint(name, params) {
    const u = new URL(`${root}/${name}`);
    if (name == "ws") u.protocol = u.protocol.replace("http", "ws");
    for (const [key, value] of params) u.searchParams.append(key, value);
    if (token) u.searchParams.set(o.tokenParam, token);
    return u.href;
  }

  // Delivers a publication once: one at or before the channel's position is
  // a duplicate (a replay that overlapped).
  function deliver(m) {
    const sub = subs.get(m.channel);
    if (!sub) return;
    // An ephemeral publication has no position: handed on, never counted.
    if (m.offset === undefined) {
      for (const h of sub.h) call(h, m.data, m);
      return emit("message", m);
    }
    const p = sub.p;
    if (p && p.epoch == m.epoch && m.offset <= p.offset) return;
    sub.p = { epoch: m.epoch, offset: m.offset };
    for (const h of sub.h) call(h, m.data, m);
    emit("message", m);
  }

  // A control push: reset, unsubscribed, join, leave.
  function control(m) {
    const sub = subs.get(m.channel);
    if (m.op == "reset" && sub) {
      sub.p = { epoch: m.epoch, offset: m.offset };
      emit("reset", { channel: m.channel, epoch: m.epoch, offset: m.offset });
    } else if (m.op == "unsubscribed") {
      subs.delete(m.channel);
      emit("unsubscribed", { channel: m.channel });
    } else if (sub) {
      emit(m.op, m);
    }
  }

  // One long-poll round: delivers what it brings and anchors every channel
  // at the cursor it returns. Resolves to the HTTP status, or rejects when
  // pushgate could not be reached.
  async function poll(timeout, signal) {
    const channels = [...subs.keys()];
    const params = channels.map((c) => ["channel", c]);
    const since = [...known()];
    if (since.length) params.push(["since", buildCursor(since)]);
    params.push(["timeout", timeout]);
    const res = await fetch(endpoint("poll", params), { credentials: "include", cache: "no-store", signal });
    if (!res.ok) return [res.status, await reason(res)];
    const body = await res.json();
    for (const r of body.reset) control({ op: "reset", ...r });
    body.messages.forEach(deliver);
    for (const [channel, p] of parseCursor(body.cursor, channels)) {
      const sub = subs.get(channel);
      if (sub && !sub.p) sub.p = p;
    }
    return [200];
  }

  async function reason(res) {
    try {
      return (await res.json()).error.message;
    } catch {
      return res.statusText;
    }
  }

  function start() {
    clearTimeout(timer);
    stop();
    if (closed || !(subs.size || calls.size)) return void (state = "idle");
    if (g.navigator && g.navigator.onLine === false) return setState("offline");
    setState("connecting");
    (o.getToken && !token ? Promise.resolve(o.getToken()).then((t) => (token = t)) : Promise.resolve()).then(
      () => state == "connecting" && !conn && open(),
      (error) => end(4001, String(error), true),
    );
  }

  function stop() {
    clearTimeout(healthy);
    const c = conn;
    conn = undefined;
    c && (c.close(), refuseAll("disconnected", "the connection ended before the reply", c));
  }

  function open() {
    const transport = available[index];
    const c = (conn = { close() {}, add() {}, drop() {} });
    let reached;
    const up = () => {
      reached = 1;
      blocked = 0;
      if (index) remembered = transport;
      setState("connected");
      healthy = setTimeout(() => (attempt = 0), o.healthyAfter);
    };
    // Ends this connection once; later calls (and stale ones) do nothing.
    const done = (code, why) => {
      if (conn != c) return;
      conn = undefined;
      clearTimeout(healthy);
      refuseAll("disconnected", `the connection ended before the reply: ${code} ${why}`, c);
      end(code, why, reached);
    };

    if (transport == "websocket") {
      const ws = new WebSocket(endpoint("ws", []));
      // id -> the channel a subscribe or unsubscribe named, or the call.
      const pending = new Map();
      let id = 0;
      const write = (command, entry) => {
        pending.set(++id, entry);
        ws.readyState == 1 && ws.send(JSON.stringify({ id, ...command }));
      };
      const send = (op, channel) => {
        const command = { op, channel };
        const p = subs.get(channel) && subs.get(channel).p;
        if (op == "subscribe" && p) command.since = `${p.epoch}:${p.offset}`;
        write(command, channel);
      };
      ws.onopen = () => {
        up();
        for (const channel of subs.keys()) send("subscribe", channel);
        for (const r of calls) r.on || c.call(r);
      };
      ws.onmessage = (event) => {
        const m = JSON.parse(event.data);
        if ("id" in m) {
          const entry = pending.get(m.id);
          pending.delete(m.id);
          if (entry && entry.ok) return answer(entry, m);
          const sub = subs.get(entry);
          if (m.error) emit("error", { channel: entry, ...m.error });
          // Replayed publications follow the reply and advance the position
          // themselves; a channel new to us starts where the reply says.
          else if (sub && !sub.p && m.result.epoch) sub.p = { epoch: m.result.epoch, offset: m.result.offset };
        } else if (m.op) control(m);
        else deliver(m);
      };
      ws.onclose = (event) => done(event.code, event.reason);
      c.close = () => {
        ws.onclose = null;
        ws.close();
      };
      // Sent only on an open socket: until then the call waits for onopen.
      c.call = (r) => {
        if (ws.readyState != 1) return;
        r.on = c;
        write(r.command, r);
      };
      c.add = (channel) => send("subscribe", channel);
      c.drop = (channel) => send("unsubscribe", channel);
      return;
    }

    // SSE and long-poll name their channels in the URL: a change of
    // channels reopens, resuming from the positions.
    const abort = new AbortController();
    const signal = abort.signal;
    c.close = () => abort.abort();
    c.add = c.drop = () => {
      c.close();
      conn = undefined;
      clearTimeout(healthy);
      subs.size ? open() : setState("idle");
    };
    const failed = (error) => signal.aborted || done(1006, String(error));

    if (transport == "sse") {
      // Channels without a position are anchored first, so a later
      // reconnect resumes them rather than starting again from now.
      const anchor = [...subs.values()].some((s) => !s.p) ? poll(0, signal) : Promise.resolve([200]);
      anchor
        .then(([status, why]) => {
          if (status != 200) return (reached = 1), done(statusCode(status), why);
          return fetch(endpoint("sse", [...subs.keys()].map((c) => ["channel", c]).concat([["last_event_id", buildCursor(known())]])), {
            credentials: "include",
            cache: "no-store",
            headers: { accept: "text/event-stream" },
            signal,
          }).then(async (res) => {
            reached = 1;
            if (!res.ok) return done(statusCode(res.status), await reason(res));
            up();
            const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
            let buffer = "";
            let event = {};
            let code = 1006;
            let why = "";
            let retries = 0;
            for (;;) {
              const { value, done: ended } = await reader.read();
              if (ended) return done(code, why);
              const lines = (buffer += value).split(/\r\n|\r|\n/);
              buffer = lines.pop();
              for (const line of lines) {
                if (!line) {
                  const data = event.data && JSON.parse(event.data);
                  const name = event.event || "";
                  // A publication is an envelope (it has `data`), whatever
                  // its event name; pushgate's own events are not.
                  if (data && "data" in data) deliver(data);
                  else if (name == "pushgate.disconnect") (code = data.code), (why = data.reason);
                  else if (data && name.startsWith("pushgate.")) control({ op: name.slice(9), ...data });
                  event = {};
                  continue;
                }
                const colon = line.indexOf(":");
                const field = line.slice(0, colon < 0 ? line.length : colon);
                const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
                if (field == "data") event.data = event.data == null ? text : `${event.data}\n${text}`;
                else if (field == "event") event.event = text;
                // A second `retry:` is pushgate going away.
                else if (field == "retry" && retries++) code = 1001;
              }
            }
          });
        })
        .catch(failed);
      return;
    }

    (async () => {
      for (let first = 1; conn == c; first = 0) {
        const [status, why] = await poll(first ? 0 : o.pollTimeout, signal);
        if (status != 200) return done(statusCode(status), why);
        if (first) up();
      }
    })().catch(failed);
  }

  // A connection ended with `code`: decide whether, how and when to come back.
  async function end(code, why, reached) {
    if (closed || conn) return;
    let action = policy(code);
    if (!reached && subs.size && available[index] != "poll") {
      // Never reached pushgate: blocked on the way, or pushgate is down? A
      // long-poll round tells them apart, and catches up meanwhile.
      const [status, probeWhy] = await poll(0).catch(() => []);
      if (closed || conn) return;
      if (status == 200 && ++blocked > 1 && index < available.length - 1) {
        blocked = 0;
        index++;
        emit("fallback", { transport: available[index] });
        refuseAll("needs_websocket", needsWebSocket());
        return start();
      }
      if (status && status != 200) return end(statusCode(status), probeWhy, 1);
    }
    if (action == "app") action = (o.onDisconnect ? o.onDisconnect(code, why) : /^reconnect/i.test(why)) ? "retry" : "stop";
    if (action == "auth") {
      let fresh;
      try {
        if (o.getToken) {
          const t = await o.getToken();
          if (t && t != token) fresh = token = t;
        }
        if (!fresh && o.onAuthExpired) {
          fresh = await o.onAuthExpired(why);
          if (typeof fresh == "string") token = fresh;
        }
      } catch {
        fresh = 0;
      }
      if (closed || conn) return;
      action = fresh ? "soon" : "stop";
    }
    if (action == "stop") {
      closed = 1;
      refuseAll("closed", `the client stopped: ${code} ${why}`);
      return setState("closed", { code, reason: why });
    }
    const delay = retryDelay(action, action == "soon" ? 0 : attempt++, o);
    setState("disconnected", { code, reason: why, delay });
    timer = setTimeout(start, delay);
  }

  function online() {
    attempt = 0;
    if (!closed && state == "offline") start();
  }

  function offline() {
    if (closed) return;
    clearTimeout(timer);
    stop();
    setState("offline");
  }

  if (g.addEventListener) {
    g.addEventListener("online", online);
    g.addEventListener("offline", offline);
  }
  return client;
}
