// What the Pusher compatibility checks share: their arguments, bounded
// waits, pusher-js clients pointed at pushgate, the Node server SDK, and the
// app's channel authorization endpoint (what Laravel serves at
// /broadcasting/auth), all from the real, unchanged npm packages that
// integration/browser/package.json pins.
//
// Every script exits 0 when each of its checks passed, and 1 with the
// failed expectation otherwise; it bounds itself in time.
import { createRequire } from "node:module";
import { createServer } from "node:http";
import { parseArgs } from "node:util";

const require = createRequire(new URL("../browser/package.json", import.meta.url));
/** pusher-js, its Node build. */
export const PusherClient = require("pusher-js");
/** The Node server SDK (`pusher`). */
export const PusherServer = require("pusher");
/** playwright-core, to drive Chromium. */
export const playwright = () => require("playwright-core");

/** How long any one thing may take. */
export const PATIENCE = 15000;

export function log(...parts) {
  console.log(`[${new Date().toISOString().slice(11, 23)}]`, ...parts);
}

export function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

/** Deep equality of JSON values, objects' keys in any order. */
export function checkEqual(actual, expected, what) {
  const a = canonical(actual);
  const e = canonical(expected);
  check(a === e, `${what}: expected ${e}, got ${a}`);
}

/** A JSON value as text, objects' keys sorted: equal values, equal texts. */
export function canonical(value) {
  return JSON.stringify(value, (_, v) =>
    v && typeof v === "object" && !Array.isArray(v)
      ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, v[k]]))
      : v,
  );
}

export function deadline(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * The arguments every script takes: pushgate's public and API addresses, and
 * two apps: one that allows client events, one that does not; a second
 * node's addresses where a scenario needs one. `required` are checked here;
 * a script that is pushgate's app hears pushgate's addresses later.
 */
export function args(extra = {}, required = ["public", "api", "app-id", "key", "secret"]) {
  const { values } = parseArgs({
    options: {
      public: { type: "string" },
      api: { type: "string" },
      "app-id": { type: "string" },
      key: { type: "string" },
      secret: { type: "string" },
      "app2-id": { type: "string" },
      key2: { type: "string" },
      secret2: { type: "string" },
      scenario: { type: "string" },
      public2: { type: "string" },
      "pushgate-key": { type: "string" },
      api2: { type: "string" },
      ...extra,
    },
  });
  for (const name of required) {
    check(values[name], `--${name} is required`);
  }
  return values;
}

/** Runs `body` with a bound on the whole script; exits 0 or 1 with the reason. */
export function main(budget, body) {
  const cleanups = [];
  const timer = setTimeout(() => {
    console.error(`FAILED: the script did not finish within ${budget} ms`);
    process.exit(1);
  }, budget);
  body(cleanups)
    .then(
      () => {
        log("all checks passed");
        return 0;
      },
      (err) => {
        // The SDK's RequestError keeps what pushgate answered beside the stack.
        const answer =
          err && err.url ? `\n  ${err.message}: ${err.status} ${JSON.stringify(err.body)} for ${err.url}` : "";
        console.error("FAILED:", err && err.stack ? err.stack : err, answer);
        return 1;
      },
    )
    .then(async (code) => {
      for (const cleanup of cleanups.reverse()) {
        try {
          await cleanup();
        } catch {
          // Cleaning up after a failure must not hide it.
        }
      }
      clearTimeout(timer);
      process.exit(code);
    });
}

/** The Node server SDK for an app, talking plain HTTP to pushgate's API listener. */
export function server(api, appId, key, secret, options = {}) {
  const [host, port] = splitAddr(api);
  return new PusherServer({ appId, key, secret, host, port, useTLS: false, timeout: PATIENCE, ...options });
}

export function splitAddr(addr) {
  const at = addr.lastIndexOf(":");
  return [addr.slice(0, at), addr.slice(at + 1)];
}

/**
 * The app's channel authorization endpoint, as Laravel's /broadcasting/auth
 * answers it: `{"auth":"key:signature"}`, and `channel_data` on presence
 * channels, signed by the SDK's `authorizeChannel`; and at /pusher/user-auth
 * pusher-js's signin, signed by `authenticateUser`. The user is the `user`
 * parameter the client sends along; `sign=forged` signs with a wrong secret,
 * `deny=1` answers 403 as an app refusing the user does.
 */
export async function authEndpoint(sdk, forger, cleanups) {
  const requests = [];
  const http = createServer((req, res) => {
    let body = "";
    req.setEncoding("utf8");
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => {
      const form = new URLSearchParams(body);
      const socketId = form.get("socket_id");
      const channel = form.get("channel_name");
      const user = form.get("user");
      requests.push({ path: req.url, socketId, channel, user });
      if (req.method !== "POST" || !socketId || (!channel && req.url !== "/pusher/user-auth")) {
        res.writeHead(400).end("socket_id and channel_name expected");
        return;
      }
      if (form.get("deny") === "1") {
        res.writeHead(403).end("forbidden");
        return;
      }
      const signer = form.get("sign") === "forged" ? forger : sdk;
      if (req.url === "/pusher/user-auth") {
        // pusher-js's signin: the user's data, signed by authenticateUser.
        const answer = signer.authenticateUser(socketId, { id: user, user_info: { name: `${user} the tester` } });
        res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(answer));
        return;
      }
      const presence = channel.startsWith("presence-")
        ? { user_id: user, user_info: { name: `${user} the tester` } }
        : undefined;
      const answer = signer.authorizeChannel(socketId, channel, presence);
      res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(answer));
    });
  });
  await new Promise((resolve) => http.listen(0, "127.0.0.1", resolve));
  cleanups.push(() => new Promise((resolve) => http.close(resolve)));
  http.closeAllConnections && cleanups.push(() => http.closeAllConnections());
  const origin = `http://127.0.0.1:${http.address().port}`;
  return { url: `${origin}/broadcasting/auth`, userUrl: `${origin}/pusher/user-auth`, requests };
}

/**
 * A pusher-js client (its Node build) of pushgate's Pusher WebSocket,
 * connected: its socket_id checked against Pusher's `\d+\.\d+` form.
 * `params` go to the authorization endpoint with each request.
 */
export async function connect(publicAddr, key, { authUrl, userUrl, params = {}, name = "client" } = {}, cleanups) {
  const [wsHost, wsPort] = splitAddr(publicAddr);
  const client = new PusherClient(key, {
    cluster: "pushgate",
    wsHost,
    wsPort: Number(wsPort),
    forceTLS: false,
    enabledTransports: ["ws"],
    disableStats: true,
    channelAuthorization: authUrl ? { endpoint: authUrl, transport: "ajax", params } : undefined,
    userAuthentication: userUrl ? { endpoint: userUrl, transport: "ajax", params } : undefined,
  });
  cleanups.push(() => client.disconnect());
  client.label = name;
  client.errors = [];
  client.connection.bind("error", (err) => client.errors.push(err));
  const connected = new Promise((resolve, reject) => {
    client.connection.bind("connected", resolve);
    client.connection.bind("failed", () => reject(new Error(`${name}: the connection failed`)));
    client.connection.bind("unavailable", () =>
      reject(new Error(`${name}: pushgate unavailable: ${JSON.stringify(client.errors)}`)),
    );
  });
  await deadline(connected, PATIENCE, `${name} to connect`);
  const socketId = client.connection.socket_id;
  check(/^\d+\.\d+$/.test(socketId), `${name}: socket_id ${JSON.stringify(socketId)} has Pusher's form \\d+.\\d+`);
  log(name, "connected as", socketId);
  return client;
}

/**
 * Subscribes `client` to `name` and records every event the channel hands
 * on (`bind_global`), with its metadata; resolves once subscribed.
 */
export async function subscribe(client, name) {
  const channel = client.subscribe(name);
  const recorded = record(channel);
  const outcome = new Promise((resolve, reject) => {
    channel.bind("pusher:subscription_succeeded", resolve);
    channel.bind("pusher:subscription_error", (err) =>
      reject(new Error(`${client.label}: subscribing to ${name} failed: ${JSON.stringify(err)}`)),
    );
  });
  const data = await deadline(outcome, PATIENCE, `${client.label} to subscribe to ${name}`);
  recorded.subscribed = data;
  return recorded;
}

/**
 * Records what a channel hands on; `next(pred)` waits for a matching event.
 * (A global callback gets no metadata: user_id is read with `bind`.)
 */
export function record(channel) {
  const events = [];
  const waiters = [];
  channel.bind_global((event, data) => {
    const entry = { event, data };
    events.push(entry);
    for (const waiter of [...waiters]) {
      if (waiter.pred(entry)) {
        waiters.splice(waiters.indexOf(waiter), 1);
        waiter.resolve(entry);
      }
    }
  });
  return {
    channel,
    events,
    /** The first event, already recorded or to come, that matches. */
    next(pred, what) {
      const seen = events.find(pred);
      if (seen) return Promise.resolve(seen);
      return deadline(
        new Promise((resolve) => waiters.push({ pred, resolve })),
        PATIENCE,
        `${channel.name}: ${what}`,
      );
    },
    names() {
      return events.map((e) => e.event);
    },
  };
}

/** Waits for the first of `client`'s connection errors that matches. */
export function nextError(client, pred, what) {
  return deadline(
    new Promise((resolve) => {
      const found = client.errors.find(pred);
      if (found) return resolve(found);
      client.connection.bind("error", (err) => pred(err) && resolve(err));
    }),
    PATIENCE,
    `${client.label}: ${what}`,
  );
}

/** The HTTP status of a rejected SDK request (its RequestError), or a failure if it succeeded. */
export async function statusOf(promise, what) {
  try {
    const res = await promise;
    throw new Error(`check failed: ${what} succeeded (${res.status}) where pushgate should refuse it`);
  } catch (err) {
    if (err.status === undefined) throw err;
    return { status: err.status, body: err.body };
  }
}
