#!/usr/bin/env python3
"""pushgate's Pusher Channels compatibility, checked with Pusher's Python
server SDK (`pusher`, unchanged) as the app's publisher, and a raw WebSocket
client (the `websockets` library) speaking Pusher's protocol 7 as the
subscriber:

  handshake   connection_established with a socket_id of Pusher's form;
              pusher:ping answered; an unknown key is not Pusher's (the
              request goes on to the app), a missing protocol closes 4008,
              an unsupported one 4007
  trigger     trigger (one channel, several, excluding a socket_id) and
              trigger_batch reach the subscriber, data as the SDK sent it
  presence    a subscription authorized with the SDK's `authenticate`; an
              unsigned one and a forged one refused with
              pusher:subscription_error; a client event on a public channel
              refused with pusher:error
  queries     channels_info, channel_info, users_info
  refusals    the SDK with a wrong secret (PusherBadAuth, 401) and an
              unknown app (404)

Usage:

  sdk_check.py --public 127.0.0.1:8080 --api 127.0.0.1:8081 \\
      --app-id 1001 --key KEY --secret SECRET

Exits 0 when every check passes, 1 with a `FAIL:` line naming the first one
that did not. Every wait is bounded. tests/clients/pusher.rs runs this in the
virtualenv built from integration/requirements.txt.
"""

import argparse
import json
import re
import sys
import threading
import time
import traceback

import pusher
from pusher.errors import PusherBadAuth, PusherBadStatus
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

# Longest wait for any one thing.
STEP_TIMEOUT = 10.0
# Longest the whole run may take.
TOTAL_TIMEOUT = 60.0


class CheckFailed(Exception):
    """A check did not hold; the message says which and what was seen."""


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def log(text):
    print(text, flush=True)


class Socket:
    """A Pusher protocol 7 connection: every frame it receives is kept, so
    a check can wait for one and later look at what else came."""

    def __init__(self, public, key, query="?protocol=7&client=pushgate-check&version=1.0"):
        self.ws = connect(f"ws://{public}/app/{key}{query}", open_timeout=STEP_TIMEOUT)
        self.seen = []

    def send(self, event, data, channel=None):
        message = {"event": event, "data": data}
        if channel is not None:
            message["channel"] = channel
        self.ws.send(json.dumps(message))

    def next(self, predicate, what):
        """The first message, seen before or to come, that matches."""
        for message in self.seen:
            if predicate(message):
                return message
        end = time.monotonic() + STEP_TIMEOUT
        while True:
            left = end - time.monotonic()
            try:
                check(left > 0, f"waited {STEP_TIMEOUT}s for {what}; got {self.seen}")
                message = json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                raise CheckFailed(f"waited {STEP_TIMEOUT}s for {what}; got {self.seen}")
            self.seen.append(message)
            if predicate(message):
                return message

    def event(self, name, channel=None):
        return self.next(
            lambda m: m.get("event") == name and (channel is None or m.get("channel") == channel),
            f"{name} on {channel}",
        )

    def established(self):
        message = self.event("pusher:connection_established")
        data = json.loads(message["data"])
        check(
            re.fullmatch(r"\d+\.\d+", data.get("socket_id", "")),
            f"socket_id has Pusher's form: {data}",
        )
        check(isinstance(data.get("activity_timeout"), int), f"activity_timeout: {data}")
        return data["socket_id"]

    def subscribe(self, channel, **fields):
        self.send("pusher:subscribe", {"channel": channel, **fields})
        return self.next(
            lambda m: m.get("channel") == channel
            and m.get("event") in ("pusher_internal:subscription_succeeded", "pusher:subscription_error"),
            f"the answer to subscribing to {channel}",
        )

    def close(self):
        self.ws.close()


def close_code(public, key, query):
    """Connects and reads until pushgate closes; the close code."""
    ws = connect(f"ws://{public}/app/{key}{query}", open_timeout=STEP_TIMEOUT)
    try:
        end = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < end:
            ws.recv(timeout=end - time.monotonic())
        raise CheckFailed(f"{query!r} on key {key!r}: still open after {STEP_TIMEOUT}s")
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None
    finally:
        ws.close()


def data_of(message):
    """A channel event's data: the string the publisher sent, parsed."""
    check(isinstance(message.get("data"), str), f"an event's data is a string: {message}")
    return json.loads(message["data"])


def handshake(args, sdk):
    sock = Socket(args.public, args.key)
    socket_id = sock.established()
    sock.send("pusher:ping", {})
    sock.event("pusher:pong")
    sock.close()
    log(f"ok: connection_established ({socket_id}) and pusher:pong")
    # An unknown key is no Pusher app's: pushgate hands the request to the
    # app behind it (unreachable here), or closes 4001; never a connection.
    try:
        got = close_code(args.public, "no-such-key", "?protocol=7")
        check(got == 4001, f"an unknown key: refused or closed 4001 expected, got close code {got}")
    except InvalidStatus as refused:
        log(f"ok: an unknown key's handshake went to the app ({refused.response.status_code})")
    for key, query, code, why in [
        (args.key, "", 4008, "no protocol version"),
        (args.key, "?protocol=99", 4007, "an unsupported protocol version"),
    ]:
        got = close_code(args.public, key, query)
        check(got == code, f"{why}: close code {code} expected, got {got}")
    log("ok: no protocol 4008, unsupported protocol 4007")


def trigger(args, sdk):
    sock = Socket(args.public, args.key)
    sock.established()
    other = Socket(args.public, args.key)
    other_id = other.established()
    for name in ("py-news", "py-sport"):
        answer = sock.subscribe(name)
        check(answer["event"] == "pusher_internal:subscription_succeeded", f"subscribed to {name}: {answer}")
    check(other.subscribe("py-news")["event"] == "pusher_internal:subscription_succeeded", "other subscribed")

    answer = sdk.trigger("py-news", "headline", {"title": "pushgate speaks Pusher"})
    check(answer == {}, f"trigger's answer: {answer!r}")
    got = sock.event("headline", "py-news")
    check(data_of(got) == {"title": "pushgate speaks Pusher"}, f"the triggered event: {got}")

    sdk.trigger(["py-news", "py-sport"], "both", {"n": 2})
    for name in ("py-news", "py-sport"):
        check(data_of(sock.event("both", name)) == {"n": 2}, f"the multi-channel event on {name}")

    answer = sdk.trigger_batch(
        [
            {"channel": "py-news", "name": "batch-a", "data": {"i": 1}},
            {"channel": "py-sport", "name": "batch-b", "data": {"i": 2}},
            {"channel": "py-news", "name": "batch-c", "data": "just text"},
        ]
    )
    check(answer == {}, f"trigger_batch's answer: {answer!r}")
    check(data_of(sock.event("batch-b", "py-sport")) == {"i": 2}, "batch-b")
    last = sock.event("batch-c", "py-news")
    check(last["data"] == "just text", f"string data relayed as the SDK sent it: {last}")
    order = [m["event"] for m in sock.seen if m.get("channel") == "py-news" and m["event"].startswith("batch-")]
    check(order == ["batch-a", "batch-c"], f"a batch's events on one channel in order: {order}")
    log("ok: trigger, multi-channel trigger and trigger_batch reached the subscriber")

    sdk.trigger("py-news", "not-for-other", {}, socket_id=other_id)
    sock.event("not-for-other", "py-news")
    sdk.trigger("py-news", "for-all", {})
    other.event("for-all", "py-news")
    names = [m.get("event") for m in other.seen]
    check("not-for-other" not in names, f"the excluded socket got the event: {names}")
    log("ok: socket_id exclusion")
    sock.close()
    other.close()


def presence(args, sdk):
    sock = Socket(args.public, args.key)
    socket_id = sock.established()
    channel = "presence-py"
    user = {"user_id": "py-user", "user_info": {"name": "Python"}}
    auth = sdk.authenticate(channel=channel, socket_id=socket_id, custom_data=user)
    answer = sock.subscribe(channel, **auth)
    check(answer["event"] == "pusher_internal:subscription_succeeded", f"presence subscription: {answer}")
    members = json.loads(answer["data"])["presence"]
    check(members["ids"] == ["py-user"] and members["count"] == 1, f"presence members: {members}")
    check(members["hash"] == {"py-user": {"name": "Python"}}, f"presence hash: {members}")
    log("ok: presence subscription authorized with the SDK's signature")

    refused = sock.subscribe("private-py")
    check(refused["event"] == "pusher:subscription_error", f"a private channel without auth: {refused}")
    forged = pusher.Pusher(args.app_id, args.key, "forged-secret", host="127.0.0.1", port=1, ssl=False)
    bad = forged.authenticate(channel="private-py", socket_id=socket_id)
    refused = sock.subscribe("private-py", **bad)
    check(refused["event"] == "pusher:subscription_error", f"a private channel with a forged auth: {refused}")
    error = refused["data"] if isinstance(refused["data"], dict) else json.loads(refused["data"])
    check(error.get("status") == 401, f"the subscription error says 401: {error}")
    log("ok: private channel without auth and with a forged auth refused")

    check(sock.subscribe("py-public")["event"] == "pusher_internal:subscription_succeeded", "py-public")
    sock.send("client-hello", {"x": 1}, channel="py-public")
    sock.event("pusher:error")
    log("ok: a client event on a public channel refused with pusher:error")
    return sock


def queries(args, sdk, holder):
    info = sdk.channels_info(prefix_filter="presence-", attributes=["user_count"])
    check(info == {"channels": {"presence-py": {"user_count": 1}}}, f"channels_info: {info}")
    info = sdk.channel_info("presence-py", ["user_count", "subscription_count"])
    check(
        info.get("occupied") is True and info.get("user_count") == 1 and info.get("subscription_count") == 1,
        f"channel_info: {info}",
    )
    info = sdk.channel_info("py-nobody", ["subscription_count"])
    check(info.get("occupied") is False, f"channel_info of an empty channel: {info}")
    users = sdk.users_info("presence-py")
    check(users == {"users": [{"id": "py-user"}]}, f"users_info: {users}")
    log("ok: channels_info, channel_info, users_info")
    holder.close()


def refusals(args, sdk):
    host, port = args.api.rsplit(":", 1)
    wrong = pusher.Pusher(args.app_id, args.key, "wrong-secret", host=host, port=int(port), ssl=False)
    try:
        wrong.trigger("py-news", "e", {})
        raise CheckFailed("a trigger signed with a wrong secret was accepted")
    except PusherBadAuth as err:
        log(f"ok: wrong secret refused (401: {err})")
    unknown = pusher.Pusher("999999", args.key, args.secret, host=host, port=int(port), ssl=False)
    try:
        unknown.trigger("py-news", "e", {})
        raise CheckFailed("a trigger for an unknown app was accepted")
    except PusherBadStatus as err:
        check(str(err).startswith("404"), f"an unknown app: 404 expected, got {err}")
        log(f"ok: unknown app refused ({err})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--public", required=True)
    parser.add_argument("--api", required=True)
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    host, port = args.api.rsplit(":", 1)
    sdk = pusher.Pusher(
        app_id=args.app_id, key=args.key, secret=args.secret, host=host, port=int(port), ssl=False, timeout=STEP_TIMEOUT
    )

    # The whole run is bounded: a stuck step ends the process.
    def overtime():
        print(f"FAIL: the checks did not finish within {TOTAL_TIMEOUT}s", flush=True)
        import os

        os._exit(1)

    timer = threading.Timer(TOTAL_TIMEOUT, overtime)
    timer.daemon = True
    timer.start()
    try:
        handshake(args, sdk)
        trigger(args, sdk)
        holder = presence(args, sdk)
        queries(args, sdk, holder)
        refusals(args, sdk)
    except CheckFailed as failed:
        print(f"FAIL: {failed}", flush=True)
        return 1
    except Exception:
        print("FAIL: unexpected error", flush=True)
        traceback.print_exc()
        return 1
    log("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
