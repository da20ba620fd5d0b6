"""A small chat written for Pusher Channels, run against pushgate.

Nothing here knows about pushgate: it is the app one writes for the hosted
Pusher service, with Pusher's own libraries, and only the three
configuration lines README.md shows point it at pushgate instead.

- The page (GET /) loads pusher-js, joins the presence channel
  `presence-lobby` (who is online, and the chat) and the user's private
  channel `private-inbox-<name>` (direct messages).
- POST /pusher/auth is the page's channel authorization endpoint: the Python
  server SDK signs the subscriptions the logged-in user may make.
- POST /say triggers the message with the server SDK: on the lobby, or on
  the recipient's private inbox.
- POST /pusher/webhook takes Pusher's webhooks (channel_occupied,
  member_added, member_removed…), checks their signature with the SDK, logs
  them and keeps the last ones, which GET /webhooks lists.

Users log in with a name (no password: a demo) kept in Flask's signed
session cookie.

Run it as README.md beside this file says. Settings, from the environment:

  PORT               where the app listens on 127.0.0.1 (5000)
  PUSHER_APP_ID      the app's id (1001)
  PUSHER_KEY         the app's key (pusher-chat-key)
  PUSHER_SECRET      the app's secret (required)
  PUSHER_CLUSTER     the hosted service's cluster (mt1)
  PUSHER_HOST        where the server SDK calls the HTTP API (127.0.0.1)
  PUSHER_PORT        ...on this port (8081)
  PUSHER_SSL         ...over TLS: true or false (false)
  PUSHER_WS_HOST     where the page's pusher-js connects (127.0.0.1)
  PUSHER_WS_PORT     ...on this port (8080)
  PUSHER_FORCE_TLS   ...over TLS: true or false (false)
  PUSHER_JS          pusher-js for the page: a URL the page loads it from, or
                     a file the app serves at /pusher.min.js
                     (static/pusher.min.js beside this file)
  SECRET_KEY         signs the session cookie (random: logins end at restart)

This is a demo: there are no passwords, and the forms have no CSRF tokens (a
real app protects its POSTs with them, e.g. Flask-WTF's CSRFProtect; the
SameSite=Lax cookie below only blunts cross-site POSTs).
"""

import collections
import json
import logging
import os
import re
import secrets
import threading
from pathlib import Path

import pusher
import requests
from pusher.errors import PusherError
from flask import (
    Flask,
    abort,
    jsonify,
    redirect,
    render_template_string,
    request,
    send_file,
    session,
)

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
log = logging.getLogger("pusher-chat")

app = Flask(__name__)
app.secret_key = os.environ.get("SECRET_KEY") or secrets.token_hex(32)
app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax")


def setting(name, default):
    return os.environ.get(name) or default


def flag(name, default):
    return setting(name, default).lower() in ("1", "true", "yes")


PUSHER_APP_ID = setting("PUSHER_APP_ID", "1001")
PUSHER_KEY = setting("PUSHER_KEY", "pusher-chat-key")
PUSHER_SECRET = os.environ.get("PUSHER_SECRET", "")
PUSHER_CLUSTER = setting("PUSHER_CLUSTER", "mt1")
# Where the server SDK calls the HTTP API: pushgate's API listener.
PUSHER_HOST = setting("PUSHER_HOST", "127.0.0.1")
PUSHER_PORT = int(setting("PUSHER_PORT", "8081"))
PUSHER_SSL = flag("PUSHER_SSL", "false")
# Where the page's pusher-js connects: pushgate's public listener.
PUSHER_WS_HOST = setting("PUSHER_WS_HOST", "127.0.0.1")
PUSHER_WS_PORT = int(setting("PUSHER_WS_PORT", "8080"))
PUSHER_FORCE_TLS = flag("PUSHER_FORCE_TLS", "false")

pusher_client = pusher.Pusher(
    app_id=PUSHER_APP_ID,
    key=PUSHER_KEY,
    secret=PUSHER_SECRET,
    cluster=PUSHER_CLUSTER,
    # pushgate instead of the hosted service: this line.
    host=PUSHER_HOST, port=PUSHER_PORT, ssl=PUSHER_SSL,
)

# What the page's pusher-js is configured with.
CLIENT = {
    "key": PUSHER_KEY,
    "cluster": PUSHER_CLUSTER,
    "wsHost": PUSHER_WS_HOST,
    "wsPort": PUSHER_WS_PORT,
    "forceTLS": PUSHER_FORCE_TLS,
}

HERE = Path(__file__).resolve().parent
PUSHER_JS = setting("PUSHER_JS", str(HERE / "static" / "pusher.min.js"))
PUSHER_JS_IS_URL = re.match(r"(?i)https?://|//", PUSHER_JS) is not None

LOBBY = "presence-lobby"
# Names go into channel names (private-inbox-<name>), so they keep to
# characters every channel name may hold.
NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
MAX_TEXT = 500

# The last webhooks that passed the signature check, newest last.
WEBHOOKS = collections.deque(maxlen=200)
WEBHOOKS_LOCK = threading.Lock()


def inbox(name):
    """A user's private channel: only its owner may subscribe."""
    return f"private-inbox-{name}"


PAGE = """<!doctype html>
<html lang="en">
<meta charset="utf-8">
<title>pusher chat</title>
<style>
  body { font: 16px/1.4 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; }
  ul { list-style: none; padding: 0; } li { padding: .2rem 0; }
  #status { color: #666; } .error { color: #b00; }
</style>
<h1>pusher chat</h1>
{% if not name %}
  <form method="post" action="/login">
    <label>Your name <input name="name" value="{{ value }}" required autofocus></label>
    <button>Log in</button>
  </form>
  {% if error %}<p class="error">{{ error }}</p>{% endif %}
{% else %}
  <form method="post" action="/logout">
    Logged in as <b>{{ name }}</b> <button>Log out</button>
  </form>
  <p id="status">connecting…</p>
  <h2>Online</h2>
  <ul id="members"></ul>
  <h2>#lobby</h2>
  <ul id="chat"></ul>
  <form id="say" method="post" action="/say">
    <select name="to" id="to"><option value="">everyone</option></select>
    <input name="text" maxlength="{{ max_text }}" required autocomplete="off" autofocus>
    <button>Send</button>
  </form>
  <h2>Direct messages</h2>
  <ul id="inbox"></ul>
  <script src="{{ pusher_js }}"></script>
  <script>
    const me = {{ name|tojson }};
    const config = {{ client|tojson }};

    const pusher = new Pusher(config.key, {
      cluster: config.cluster,
      // pushgate instead of the hosted service: these two lines.
      wsHost: config.wsHost, wsPort: config.wsPort, forceTLS: config.forceTLS,
      enabledTransports: ["ws", "wss"],
      channelAuthorization: { endpoint: "/pusher/auth", transport: "ajax" },
    });

    const status = (text) => { document.getElementById("status").textContent = text; };
    function show(list, text) {
      const item = document.createElement("li");
      item.textContent = text;   // text, never HTML: what users type stays text
      document.getElementById(list).append(item);
    }
    pusher.connection.bind("state_change", ({ current }) => status(current));

    // Who is online: the presence channel's members, kept by pusher-js.
    const lobby = pusher.subscribe({{ lobby|tojson }});
    function showMembers() {
      const list = document.getElementById("members");
      const to = document.getElementById("to");
      const chosen = to.value;
      list.replaceChildren();
      to.replaceChildren(new Option("everyone", ""));
      const names = [];
      lobby.members.each((member) => names.push(member.info.name));
      for (const name of names.sort()) {
        const item = document.createElement("li");
        item.textContent = name === me ? `${name} (you)` : name;
        list.append(item);
        if (name !== me) to.append(new Option(`only ${name}`, name, false, name === chosen));
      }
    }
    lobby.bind("pusher:subscription_succeeded", showMembers);
    lobby.bind("pusher:member_added", showMembers);
    lobby.bind("pusher:member_removed", showMembers);
    lobby.bind("pusher:subscription_error", (error) => status(`lobby: ${error.status}`));
    lobby.bind("message", (data) => show("chat", `${data.from}: ${data.text}`));

    // Direct messages: the user's own private channel.
    const inbox = pusher.subscribe({{ inbox|tojson }});
    inbox.bind("message", (data) => show("inbox", `${data.from}: ${data.text}`));
    inbox.bind("pusher:subscription_error", (error) => status(`inbox: ${error.status}`));

    document.getElementById("say").addEventListener("submit", async (event) => {
      event.preventDefault();
      const form = event.target;
      const fields = new FormData(form);
      const response = await fetch("/say", { method: "POST", body: new URLSearchParams(fields) });
      if (!response.ok) {
        status(`not sent: ${(await response.json()).error}`);
        return;
      }
      if (fields.get("to")) show("inbox", `you to ${fields.get("to")}: ${fields.get("text")}`);
      form.elements.text.value = "";
    });
  </script>
{% endif %}
</html>
"""


def current_user():
    return session.get("name")


def page(error=None, value="", status=200):
    name = current_user()
    return (
        render_template_string(
            PAGE,
            name=name,
            error=error,
            value=value,
            max_text=MAX_TEXT,
            client=CLIENT,
            lobby=LOBBY,
            inbox=inbox(name) if name else None,
            pusher_js=PUSHER_JS if PUSHER_JS_IS_URL else "/pusher.min.js",
        ),
        status,
    )


@app.get("/")
def index():
    return page()


@app.get("/pusher.min.js")
def pusher_js():
    if PUSHER_JS_IS_URL or not Path(PUSHER_JS).is_file():
        abort(404)
    return send_file(PUSHER_JS, mimetype="text/javascript", max_age=3600)


@app.post("/login")
def login():
    name = request.form.get("name", "").strip()
    if not NAME.fullmatch(name):
        return page("A name is 1 to 32 letters, digits, _ or -.", value=name, status=400)
    session.clear()
    session["name"] = name
    return redirect("/", code=303)


@app.post("/logout")
def logout():
    session.clear()
    return redirect("/", code=303)


@app.post("/pusher/auth")
def pusher_auth():
    """pusher-js asks here before it subscribes to a private or presence
    channel: the SDK signs what the logged-in user may hear."""
    name = current_user()
    if not name:
        return jsonify(error="log in first"), 403
    channel = request.form.get("channel_name", "")
    socket_id = request.form.get("socket_id", "")
    try:
        if channel == LOBBY:
            auth = pusher_client.authenticate(
                channel=channel,
                socket_id=socket_id,
                custom_data={"user_id": name, "user_info": {"name": name}},
            )
        elif channel == inbox(name):
            auth = pusher_client.authenticate(channel=channel, socket_id=socket_id)
        else:
            log.info("auth refused: %s may not subscribe to %s", name, channel)
            return jsonify(error="not your channel"), 403
    except ValueError as err:  # a socket_id or channel name the SDK rejects
        return jsonify(error=str(err)), 400
    return jsonify(auth)


@app.post("/say")
def say():
    name = current_user()
    if not name:
        return jsonify(error="log in first"), 401
    text = request.form.get("text", "").strip()
    if not text or len(text) > MAX_TEXT:
        return jsonify(error=f"a message is 1 to {MAX_TEXT} characters"), 400
    to = request.form.get("to", "").strip()
    if to and not NAME.fullmatch(to):
        return jsonify(error="no such user"), 400
    channel = inbox(to) if to else LOBBY
    try:
        pusher_client.trigger(channel, "message", {"from": name, "text": text})
    except (PusherError, requests.RequestException) as err:
        log.warning("trigger on %s failed: %s", channel, err)
        return jsonify(error="the message could not be sent"), 502
    return jsonify(channel=channel)


@app.post("/pusher/webhook")
def pusher_webhook():
    """Pusher's webhooks, kept only when the SDK finds them signed with this
    app's secret (and recent)."""
    webhook = pusher_client.validate_webhook(
        key=request.headers.get("X-Pusher-Key", ""),
        signature=request.headers.get("X-Pusher-Signature", ""),
        body=request.get_data(as_text=True),
    )
    if webhook is None:
        log.warning("webhook refused: not signed with this app's key and secret")
        return jsonify(error="invalid webhook"), 401
    with WEBHOOKS_LOCK:
        for event in webhook["events"]:
            log.info("webhook verified: %s", json.dumps(event, sort_keys=True))
            WEBHOOKS.append(event)
    return jsonify(ok=True)


@app.get("/webhooks")
def webhooks():
    """The webhooks kept, for whoever is logged in (a demo's view of them)."""
    if not current_user():
        return jsonify(error="log in first"), 401
    with WEBHOOKS_LOCK:
        return jsonify(webhooks=list(WEBHOOKS))


if __name__ == "__main__":
    if not PUSHER_SECRET:
        log.warning("PUSHER_SECRET is not set: triggers, authorizations and webhooks will fail")
    if not PUSHER_JS_IS_URL and not Path(PUSHER_JS).is_file():
        log.warning("no pusher-js at %s: see README.md for where to get it", PUSHER_JS)
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")))
