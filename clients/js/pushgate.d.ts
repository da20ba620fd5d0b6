// Types for pushgate's browser client (pushgate.js beside this file).
// Guide: docs/client.md. Wire protocol: docs/protocol.md.

/** A transport, most capable first. */
export type Transport = "websocket" | "sse" | "poll";

/** The transports in the order the client tries them. */
export const TRANSPORTS: readonly Transport[];

/** Where a publication sits in its channel's stream. */
export interface Position {
  epoch: string;
  offset: number;
}

/** Every publication arrives as this envelope, on every transport. */
export interface Envelope<T = unknown> {
  channel: string;
  /** Absent on an ephemeral publication (a client's, on a channel with `ephemeral: true`): it is not stored and has no position. */
  epoch?: string;
  offset?: number;
  /** Present when the publisher named an event. */
  event?: string;
  /** Present on a publication a client sent (`publish`): its user, set by pushgate from the grant. */
  user?: string;
  data: T;
}

/**
 * - `idle`: no channel yet (the client connects on the first subscribe).
 * - `connecting`: opening a connection.
 * - `connected`: the transport is up.
 * - `disconnected`: lost; a reconnect is scheduled after `delay` ms.
 * - `offline`: the browser is offline; the client waits for `online`.
 * - `closed`: stopped for good (`close()`, 4003, 1008, refused credentials,
 *   or the app's disconnect), with the code and reason.
 */
export type State = "idle" | "connecting" | "connected" | "disconnected" | "offline" | "closed";

export interface StateEvent {
  state: State;
  transport: Transport;
  /** The close code (or the code an HTTP refusal stands for), when disconnected or closed. */
  code?: number;
  reason?: string;
  /** Milliseconds until the next attempt, when disconnected. */
  delay?: number;
}

/** History could not cover a gap: reload the channel's state from the app. */
export interface ResetEvent {
  channel: string;
  epoch: string;
  offset: number;
}

/** A subscribe the server refused (WebSocket), e.g. `forbidden`. */
export interface ErrorEvent {
  channel: string;
  code: string;
  message: string;
}

export interface PresenceEvent {
  op: "join" | "leave";
  channel: string;
  user: string;
  connection: string;
  info: unknown;
}

export interface Events {
  state: StateEvent;
  message: Envelope;
  reset: ResetEvent;
  error: ErrorEvent;
  unsubscribed: { channel: string };
  join: PresenceEvent;
  leave: PresenceEvent;
  /** The client fell back to a less capable transport, for the rest of the page's life. */
  fallback: { transport: Transport };
}

export interface Options {
  /** Transports to use, in order (default all three). */
  transports?: Transport[];
  /** Base of the backoff and ceiling of the first retry, ms (500). */
  minDelay?: number;
  /** Longest wait between attempts, ms (30000). */
  maxDelay?: number;
  /** Base of the longer backoff after 1013 and 4029, ms (5000). */
  slowDelay?: number;
  /** A connection up this long resets the backoff, ms (5000). */
  healthyAfter?: number;
  /** Seconds a long-poll waits for news (25; pushgate caps it). */
  pollTimeout?: number;
  /** Positions to resume from, e.g. kept in sessionStorage: {channel: "epoch:offset"}. */
  positions?: Record<string, string>;
  /**
   * Returns a token (JWT mode), sent as `?token=`. Called before the first
   * connection and after a 4001; a 4001 is retried only when it returns a
   * different token.
   */
  getToken?: () => string | undefined | Promise<string | undefined>;
  /** The query parameter of the token (auth.jwt.query_param, "token"). */
  tokenParam?: string;
  /**
   * Called after a 4001 when getToken gave nothing new. Return true once the
   * credentials were renewed (e.g. the user logged in again and has a new
   * cookie), or a new token, to reconnect; anything else stops the client.
   */
  onAuthExpired?: (reason: string) => boolean | string | void | Promise<boolean | string | void>;
  /**
   * Called when the app disconnected the client (codes 4000–4999 other than
   * 4001, 4003, 4008, 4029): true reconnects. Without it, the client
   * reconnects when the reason starts with "reconnect", and stops otherwise.
   */
  onDisconnect?: (code: number, reason: string) => boolean;
  /**
   * The longest a call (`rpc`, `publish`) may take, waiting for a WebSocket
   * included, ms (15000); then it is rejected with `timeout`.
   */
  callTimeout?: number;
  /** Calls that may wait for a WebSocket at once (100); one more is rejected with `queue_full`. */
  maxQueued?: number;
}

/**
 * Why a call (`rpc`, `publish`) failed: an Error with a `code`.
 * - pushgate's or the app's code from the error reply (docs/protocol.md#errors),
 *   e.g. `forbidden`, `publish_not_allowed`, `app_timeout`, or the app's own;
 *   `message` is the reply's message.
 * - `needs_websocket`: the client uses SSE or long-poll (it fell back, or
 *   `transports` has no WebSocket); calls need the WebSocket.
 * - `disconnected`: the connection ended after the call was sent; pushgate
 *   never answers it on another one. A publish may or may not have been made.
 * - `timeout`: no reply within `callTimeout` (a publish may still have been made).
 * - `queue_full`: `maxQueued` calls already wait for a connection.
 * - `closed`: the client was closed, or stopped for good.
 * - `bad_json`: the data cannot be written as JSON.
 */
export interface CallError extends Error {
  code: string;
}

/** Where a client's publish was stored. */
export interface Published {
  epoch: string;
  offset: number;
}

export interface Subscription {
  /** Removes this handler; the channel is left when no handler remains. */
  unsubscribe(): void;
}

export interface Client {
  readonly state: State;
  readonly transport: Transport;
  /**
   * Hears `channel`: `handler` gets each publication's data and envelope,
   * once and in order, resuming after reconnects.
   */
  subscribe<T = unknown>(channel: string, handler?: (data: T, envelope: Envelope<T>) => void): Subscription;
  /** Leaves `channel` (every handler). */
  unsubscribe(channel: string): void;
  /** Listens for an event; returns a function that stops listening. */
  on<K extends keyof Events>(event: K, listener: (event: Events[K]) => void): () => void;
  /** The channel's position, "epoch:offset", once known. */
  position(channel: string): string | undefined;
  /** A cursor holding every known position (docs/protocol.md#cursors). */
  cursor(): string;
  /**
   * Calls the app's `rpc.path` with `method` and `data` over the WebSocket;
   * resolves to the app's JSON answer, or rejects with a {@link CallError}.
   * Waits for the WebSocket when it is not open yet (opening one if needed).
   */
  rpc<R = unknown>(method: string, data?: unknown): Promise<R>;
  /**
   * Publishes `data` on `channel` (its `channels` rule must allow clients to
   * publish, and the grant cover it); resolves to where it was stored, or
   * rejects with a {@link CallError}. Subscribers get it with `user` set.
   */
  publish(channel: string, data: unknown, options?: { event?: string }): Promise<Published>;
  /** Reconnects now, e.g. after the user logged in again. */
  reconnect(): void;
  /** Closes the connection for good. */
  close(): void;
}

/**
 * Opens a client on pushgate's realtime endpoints under `url` (its
 * `realtime.prefix`; default "/realtime" on the page's origin).
 */
export function connect(url?: string, options?: Options): Client;

/** What a close code asks of the client. */
export type Action = "soon" | "retry" | "slow" | "auth" | "stop" | "app";
export function policy(code: number): Action;
/** The close code an HTTP refusal of SSE or long-poll stands for (401 → 4001, …). */
export function statusCode(status: number): number;
/** Full jitter: a random delay in [0, min(max, base * 2^attempt)). */
export function backoff(attempt: number, base: number, max: number, random?: () => number): number;
export function retryDelay(
  action: Action,
  attempt: number,
  options: { minDelay: number; maxDelay: number; slowDelay: number },
  random?: () => number,
): number;
/** FNV-1a 32 of an ASCII string. */
export function fnv1a32(text: string): number;
/** A version-1 cursor from [channel, position] pairs (channels whose hashes collide in name order). */
export function buildCursor(positions: Iterable<[string, Position]>): string;
/** The positions a cursor holds for `channels` (those it can tell apart); throws on a bad cursor. */
export function parseCursor(text: string, channels: string[]): Map<string, Position>;
