#!/usr/bin/env python3
"""pushgate, checked with clients pushgate's authors did not write.

Uses the `websockets` library (asyncio client) for WebSocket, `httpx` for the
publish API and `httpx-sse` for Server-Sent Events, against a running
pushgate:

  ws       a WebSocket connected with ?channel= receives 50 publications in
           order; a `subscribe` command with `since` on a second channel
           replays exactly what followed that position, then goes on live.
  sse      an SSE stream receives publications, disconnects, reconnects with
           Last-Event-ID and gets the rest exactly once, in order.
  origin   a WebSocket handshake from a foreign Origin is refused with 403;
           one from pushgate's own origin is accepted.
  deflate  the client's permessage-deflate offer is accepted (the 101 says
           so); a large publication (sent compressed) and a small one (sent
           as it is) arrive intact; commands, which the client compresses,
           get their replies.

Usage:

  third_party_clients.py --public 127.0.0.1:8080 --api 127.0.0.1:8081 --key KEY

or the same in REALTIME_PUBLIC_ADDR, REALTIME_API_ADDR and REALTIME_API_KEY.
Exits 0 when every check passes, 1 with a `FAIL:` line naming the first one
that did not, 2 on bad usage or an unexpected error. Every wait is bounded.

tests/clients/third_party.rs runs this in a virtualenv built from requirements.txt
beside it, as part of `cargo test`.
"""

import argparse
import asyncio
import json
import os
import sys
import traceback
import uuid

import httpx
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

# Longest wait for any one thing: a reply, an event, an HTTP answer.
STEP_TIMEOUT = 10.0
# Longest the whole run may take.
TOTAL_TIMEOUT = 90.0


class CheckFailed(Exception):
    """A check did not hold; the message says which and what was seen."""


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def log(text):
    print(text, flush=True)


# --- cursors (docs/protocol.md, "Cursors") ---------------------------------


def fnv1a32(data: bytes) -> int:
    value = 0x811C9DC5
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def cursor_positions(cursor: str) -> dict:
    """Decodes a version 1 cursor into {channel hash: (epoch, offset)},
    checking its checksum."""
    body, _, checksum = cursor.rpartition(".")
    check(
        body and checksum == f"{fnv1a32(body.encode()):08x}",
        f"cursor {cursor!r}: the checksum does not match",
    )
    fields = body.split(".")
    check(
        fields[0] == "1" and (len(fields) - 1) % 3 == 0,
        f"cursor {cursor!r}: not a version 1 cursor",
    )
    positions = {}
    for i in range(1, len(fields), 3):
        hash_hex, epoch, offset36 = fields[i : i + 3]
        positions[hash_hex] = (epoch, int(offset36, 36))
    return positions


# --- the publish API ---------------------------------------------------------


class Api:
    def __init__(self, client: httpx.AsyncClient, addr: str, key: str):
        self.client = client
        self.url = f"http://{addr}/api/publish"
        self.headers = {"Authorization": f"Bearer {key}"}

    async def publish(self, channel: str, data) -> dict:
        """Publishes one message; returns its envelope as subscribers must
        see it: {channel, epoch, offset, data}."""
        response = await self.client.post(
            self.url, json={"channel": channel, "data": data}, headers=self.headers
        )
        check(
            response.status_code == 200,
            f"publish to {channel}: HTTP {response.status_code}: {response.text}",
        )
        results = response.json().get("results")
        check(
            isinstance(results, list) and len(results) == 1,
            f"publish to {channel}: expected one result, got {response.text}",
        )
        result = results[0]
        check(
            result.get("channel") == channel
            and isinstance(result.get("epoch"), str)
            and isinstance(result.get("offset"), int),
            f"publish to {channel}: malformed result {result!r}",
        )
        return {
            "channel": channel,
            "epoch": result["epoch"],
            "offset": result["offset"],
            "data": data,
        }

    async def publish_many(self, channel: str, first: int, last: int) -> list:
        """Publishes messages numbered first..=last, one request each, and
        checks that they took consecutive offsets."""
        envelopes = []
        for n in range(first, last + 1):
            envelopes.append(
                await self.publish(channel, {"n": n, "text": f"message {n}: ü → 世界"})
            )
        offsets = [e["offset"] for e in envelopes]
        check(
            offsets == list(range(offsets[0], offsets[0] + len(offsets)))
            and len({e["epoch"] for e in envelopes}) == 1,
            f"publish to {channel}: offsets not consecutive in one epoch: "
            f"{[(e['epoch'], e['offset']) for e in envelopes]}",
        )
        return envelopes


# --- WebSocket ---------------------------------------------------------------


def ws_connect(url: str, **kwargs):
    # proxy=None: straight to pushgate, whatever *_proxy the environment has.
    return connect(
        url, open_timeout=STEP_TIMEOUT, close_timeout=5, proxy=None, **kwargs
    )


async def ws_receive(ws, what: str):
    try:
        message = await asyncio.wait_for(ws.recv(), STEP_TIMEOUT)
    except asyncio.TimeoutError:
        raise CheckFailed(f"websocket: nothing within {STEP_TIMEOUT}s while waiting for {what}")
    check(isinstance(message, str), f"websocket: a binary frame while waiting for {what}")
    try:
        return json.loads(message)
    except ValueError:
        raise CheckFailed(f"websocket: not JSON while waiting for {what}: {message!r}")


async def ws_command(ws, command: dict):
    """Sends a command; its reply must be the next message. Returns the result."""
    await ws.send(json.dumps(command))
    reply = await ws_receive(ws, f"the reply to {command}")
    check(
        reply.get("id") == command["id"],
        f"websocket: expected the reply to {command}, got {reply}",
    )
    if "error" in reply:
        raise CheckFailed(f"websocket: {command} failed: {reply['error']}")
    check("result" in reply, f"websocket: a reply without result: {reply}")
    return reply["result"]


async def ws_expect(ws, expected: list, what: str):
    for i, envelope in enumerate(expected):
        got = await ws_receive(ws, f"{what}: envelope {i + 1} of {len(expected)}")
        check(
            got == envelope,
            f"websocket: {what}: envelope {i + 1} of {len(expected)}: "
            f"expected {envelope}, got {got}",
        )


async def check_websocket(public: str, api: Api, run: str):
    live = f"py.ws.{run}"
    replayed = f"py.ws.replay.{run}"
    async with ws_connect(f"ws://{public}/realtime/ws?channel={live}") as ws:
        # Commands are read once the query's channels are subscribed, so the
        # answered ping means publications from now on reach this connection.
        check(await ws_command(ws, {"id": 1, "op": "ping"}) == {}, "websocket: ping")

        sent = await api.publish_many(live, 1, 50)
        check(sent[0]["offset"] == 1, f"websocket: a new channel began at {sent[0]}")
        await ws_expect(ws, sent, f"live on {live}")
        log(f"ok  websocket: 50 publications on {live} arrived in order, exactly")

        history = await api.publish_many(replayed, 1, 20)
        epoch = history[0]["epoch"]
        since = 7
        result = await ws_command(
            ws,
            {"id": 2, "op": "subscribe", "channel": replayed, "since": f"{epoch}:{since}"},
        )
        check(
            result == {"recovered": True, "epoch": epoch, "offset": 20},
            f"websocket: subscribe since {epoch}:{since}: expected recovered at "
            f"{epoch}:20, got {result}",
        )
        await ws_expect(ws, history[since:], f"replay of {replayed} since {since}")
        # Nothing replayed twice or left over: the next message is a new
        # publication, on either channel.
        after = await api.publish(replayed, {"n": "live after replay"})
        await ws_expect(ws, [after], f"live on {replayed} after its replay")
        again = await api.publish(live, {"n": "still live"})
        await ws_expect(ws, [again], f"live on {live} after the replay")
        log(
            f"ok  websocket: subscribe since {epoch}:{since} replayed offsets "
            f"{since + 1}..20 exactly, then live"
        )


async def check_deflate(public: str, api: Api, run: str):
    channel = f"py.deflate.{run}"
    # websockets offers permessage-deflate by default; say so, so the check
    # holds whatever its defaults become.
    async with ws_connect(f"ws://{public}/realtime/ws", compression="deflate") as ws:
        offer = ws.request.headers.get("Sec-WebSocket-Extensions", "")
        answer = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        check(
            answer.startswith("permessage-deflate"),
            f"deflate: the 101 did not take permessage-deflate: {answer!r}",
        )
        names = [extension.name for extension in ws.protocol.extensions]
        check(names == ["permessage-deflate"], f"deflate: negotiated {names}")
        # The client compresses every message it sends; a long command too.
        result = await ws_command(
            ws, {"id": 1, "op": "subscribe", "channel": channel, "note": "x" * 2000}
        )
        check(isinstance(result.get("epoch"), str), f"deflate: subscribe: {result}")
        large = {"rows": [{"n": n, "text": f"row {n}: ü → 世界"} for n in range(100)]}
        small = {"n": 1}
        sent = [await api.publish(channel, large), await api.publish(channel, small)]
        check(len(json.dumps(large)) > 2000, "deflate: the large publication is large")
        await ws_expect(ws, sent, f"compressed and plain publications on {channel}")
        check(await ws_command(ws, {"id": 2, "op": "ping"}) == {}, "deflate: ping")
    log(
        f"ok  deflate: offered {offer!r}, answered {answer!r}; a {len(json.dumps(large))}-byte and a "
        "small publication arrived intact; compressed commands were answered"
    )


async def check_origin(public: str):
    url = f"ws://{public}/realtime/ws?channel=py.origin"
    foreign = "https://evil.example"
    try:
        async with ws_connect(url, origin=foreign):
            raise CheckFailed(f"origin: a WebSocket from {foreign} was accepted")
    except InvalidStatus as err:
        status = err.response.status_code
        check(status == 403, f"origin: {foreign} refused with {status}, not 403")
    log(f"ok  origin: a WebSocket handshake from {foreign} was refused with 403")

    own = f"http://{public}"
    async with ws_connect(url, origin=own) as ws:
        check(await ws_command(ws, {"id": 1, "op": "ping"}) == {}, "origin: ping")
    log(f"ok  origin: a WebSocket handshake from {own} was accepted")


# --- Server-Sent Events ------------------------------------------------------


class SseReader:
    """Reads envelopes from one SSE response, checking every event's id."""

    def __init__(self, source, channel: str):
        response = source.response
        check(
            response.status_code == 200,
            f"sse: HTTP {response.status_code}: {response.headers}",
        )
        self.events = source.aiter_sse()
        self.channel = channel
        self.hash = f"{fnv1a32(channel.encode()):08x}"
        self.retry = None
        self.last_id = None

    async def next_envelope(self, what: str) -> dict:
        while True:
            try:
                event = await asyncio.wait_for(self.events.__anext__(), STEP_TIMEOUT)
            except asyncio.TimeoutError:
                raise CheckFailed(f"sse: nothing within {STEP_TIMEOUT}s while waiting for {what}")
            except StopAsyncIteration:
                raise CheckFailed(f"sse: the stream ended while waiting for {what}")
            if event.retry is not None:
                self.retry = event.retry
            if event.data == "" and event.event == "message":
                continue  # the `retry:` block
            check(
                event.event == "message",
                f"sse: unexpected event {event.event!r} ({event.data}) while waiting for {what}",
            )
            try:
                envelope = json.loads(event.data)
            except ValueError:
                raise CheckFailed(f"sse: data is not JSON while waiting for {what}: {event.data!r}")
            check(
                isinstance(envelope, dict),
                f"sse: data is not an envelope while waiting for {what}: {event.data!r}",
            )
            # The id is the cursor after this event: it names this channel at
            # this very publication.
            check(event.id, f"sse: an event without an id while waiting for {what}")
            position = cursor_positions(event.id).get(self.hash)
            at = (envelope.get("epoch"), envelope.get("offset"))
            check(
                position == at,
                f"sse: event id {event.id!r} names {position}, but the event is at {at}",
            )
            self.last_id = event.id
            return envelope

    async def expect(self, expected: list, what: str):
        for i, envelope in enumerate(expected):
            got = await self.next_envelope(f"{what}: event {i + 1} of {len(expected)}")
            check(
                got == envelope,
                f"sse: {what}: event {i + 1} of {len(expected)}: expected {envelope}, got {got}",
            )

    async def close(self):
        await self.events.aclose()


async def check_sse(public: str, api: Api, client: httpx.AsyncClient, run: str):
    channel = f"py.sse.{run}"
    url = f"http://{public}/realtime/sse?channel={channel}"

    async with aconnect_sse(client, "GET", url) as source:
        reader = SseReader(source, channel)
        try:
            # pushgate subscribes before it answers, so these all arrive.
            sent = await api.publish_many(channel, 1, 10)
            await reader.expect(sent[:5], "before the disconnect")
            check(reader.retry is not None, "sse: no `retry:` before the first event")
            last_id = reader.last_id
        finally:
            await reader.close()
    log(f"ok  sse: 5 of 10 publications read, then disconnected at id {last_id}")

    # Published while the client is away.
    sent += await api.publish_many(channel, 11, 20)

    async with aconnect_sse(client, "GET", url, headers={"Last-Event-ID": last_id}) as source:
        reader = SseReader(source, channel)
        try:
            await reader.expect(sent[5:], "after reconnecting with Last-Event-ID")
            # Nothing twice, nothing left over: next comes a new publication.
            live = await api.publish(channel, {"n": "live after resume"})
            await reader.expect([live], "live after the resume")
        finally:
            await reader.close()
    log("ok  sse: reconnected with Last-Event-ID; offsets 6..20 arrived once each, in order, then live")


# --- main --------------------------------------------------------------------


async def run_checks(public: str, api_addr: str, key: str):
    run = uuid.uuid4().hex[:12]
    # trust_env=False: no proxy from the environment between us and pushgate.
    timeout = httpx.Timeout(STEP_TIMEOUT)
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        api = Api(client, api_addr, key)
        await check_websocket(public, api, run)
        await check_deflate(public, api, run)
        await check_sse(public, api, client, run)
        await check_origin(public)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--public",
        default=os.environ.get("REALTIME_PUBLIC_ADDR"),
        help="pushgate's public listener, host:port (env REALTIME_PUBLIC_ADDR)",
    )
    parser.add_argument(
        "--api",
        default=os.environ.get("REALTIME_API_ADDR"),
        help="pushgate's API listener, host:port (env REALTIME_API_ADDR)",
    )
    parser.add_argument(
        "--key",
        default=os.environ.get("REALTIME_API_KEY"),
        help="an API key (env REALTIME_API_KEY)",
    )
    args = parser.parse_args()
    missing = [name for name in ("public", "api", "key") if not getattr(args, name)]
    if missing:
        parser.error("missing: " + ", ".join("--" + name for name in missing))

    try:
        asyncio.run(
            asyncio.wait_for(run_checks(args.public, args.api, args.key), TOTAL_TIMEOUT)
        )
    except CheckFailed as err:
        print(f"FAIL: {err}", file=sys.stderr, flush=True)
        return 1
    except asyncio.TimeoutError:
        # The whole run's deadline, or a client library's own (a handshake's
        # open_timeout): the traceback says which wait it was.
        traceback.print_exc()
        print(
            f"FAIL: timed out (the whole run is bounded at {TOTAL_TIMEOUT}s, "
            f"each wait at {STEP_TIMEOUT}s)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except Exception:
        print("ERROR: unexpected exception:", file=sys.stderr)
        traceback.print_exc()
        return 2
    log("all third-party client checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
