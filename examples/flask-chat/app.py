"""A small chat in Flask, with pushgate in front of it for the realtime part.

The app knows nothing about WebSockets. It:

- serves a page (GET /) whose script opens a WebSocket to pushgate's
  /realtime/ws and subscribes to the lobby and to the user's notifications;
- logs users in with its own signed session cookie (POST /login, /logout);
- answers pushgate's questions about a connection from that cookie
  (POST /realtime/auth when it opens, POST /realtime/refresh when the grant
  runs out): who it is and which channels it may hear;
- publishes through pushgate's API (POST /say), and disconnects a user's
  connections at logout.

Run it as README.md beside this file says. Settings, from the environment:

  PORT               where the app listens on 127.0.0.1 (5000)
  REALTIME_API_URL   pushgate's API (http://127.0.0.1:8081)
  REALTIME_API_KEY   one of pushgate's api.keys (required to publish)
  SECRET_KEY         signs the session cookie (random: logins end at restart)
  GRANT_SECONDS      how long a realtime grant lasts before pushgate asks
                     /realtime/refresh (300)

This is a demo: there are no passwords, and the forms have no CSRF tokens (a
real app protects its POSTs with them, e.g. Flask-WTF's CSRFProtect; the
SameSite=Lax cookie below only blunts cross-site POSTs).
"""

import json
import os
import re
import secrets
import threading
import urllib.error
import urllib.request

from flask import Flask, jsonify, redirect, render_template_string, request, session

app = Flask(__name__)
app.secret_key = os.environ.get("SECRET_KEY") or secrets.token_hex(32)
app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax")

REALTIME_API_URL = os.environ.get("REALTIME_API_URL", "http://127.0.0.1:8081").rstrip("/")
REALTIME_API_KEY = os.environ.get("REALTIME_API_KEY", "")
GRANT_SECONDS = int(os.environ.get("GRANT_SECONDS", "300"))

LOBBY = "chat:lobby"
# Names go into channel names (user:<name>:notifications), whose characters
# are limited, and the grant's `user:<name>:*` must not reach another user's
# channels: so no `:` and no `*`.
NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
MAX_TEXT = 500

# Flask keeps the session inside the cookie, so a copy of the cookie taken
# before logout would stay valid for ever, and pushgate keeps the cookie of a
# connection to refresh it later. The cookie therefore carries only a random
# login id, and the logins that are live are kept here: logout forgets one.
# (In memory, for one process; a real app keeps sessions in its database.)
LOGINS = {}
LOGINS_LOCK = threading.Lock()

# pushgate's API is local: never send it through an HTTP proxy from the
# environment.
API = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def current_user():
    """The name of the logged-in user, or None."""
    login = session.get("login")
    if not login:
        return None
    with LOGINS_LOCK:
        return LOGINS.get(login)


def pushgate(path, body):
    """POSTs JSON to pushgate's API; returns the JSON answer."""
    call = urllib.request.Request(
        REALTIME_API_URL + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "Authorization": f"Bearer {REALTIME_API_KEY}",
            "Content-Type": "application/json",
        },
    )
    with API.open(call, timeout=5) as answer:
        return json.load(answer)


def grant(name):
    """What pushgate is told about a logged-in user's connection."""
    return jsonify(
        user=name,
        channels=[LOBBY, f"user:{name}:*"],
        expires_in=GRANT_SECONDS,
        info={"name": name},
    )


PAGE = """<!doctype html>
<html lang="en">
<meta charset="utf-8">
<title>pushgate chat</title>
<style>
  body { font: 16px/1.4 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; }
  ul { list-style: none; padding: 0; } li { padding: .2rem 0; }
  #status { color: #666; } .error { color: #b00; }
</style>
<h1>pushgate chat</h1>
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
  <h2>#lobby</h2>
  <ul id="chat"></ul>
  <form id="say" method="post" action="/say">
    <input name="text" maxlength="{{ max_text }}" required autocomplete="off" autofocus>
    <button>Send</button>
  </form>
  <h2>Your notifications</h2>
  <ul id="notes"></ul>
  <script>
    const me = {{ name|tojson }};
    const channels = ["chat:lobby", `user:${me}:notifications`];
    const positions = {};   // channel -> "epoch:offset": where to resume
    const pending = {};     // command id -> channel
    let nextId = 1;
    let backoff = 1000;

    const status = (text) => { document.getElementById("status").textContent = text; };
    function show(list, text) {
      const item = document.createElement("li");
      item.textContent = text;   // text, never HTML: what users type stays text
      document.getElementById(list).append(item);
    }

    function connect() {
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const ws = new WebSocket(`${scheme}//${location.host}/realtime/ws`);
      ws.onopen = () => {
        status("connected");
        backoff = 1000;
        for (const channel of channels) {
          const command = { id: nextId++, op: "subscribe", channel };
          // After a reconnect, resume where we were: nothing is missed.
          if (positions[channel]) command.since = positions[channel];
          pending[command.id] = channel;
          ws.send(JSON.stringify(command));
        }
      };
      ws.onmessage = (event) => {
        const message = JSON.parse(event.data);
        if ("id" in message) {            // a reply to one of our commands
          const channel = pending[message.id];
          delete pending[message.id];
          if (message.error) status(`${channel}: ${message.error.message}`);
          else positions[channel] = `${message.result.epoch}:${message.result.offset}`;
        } else if (message.op === "reset") {   // a gap history could not cover
          positions[message.channel] = `${message.epoch}:${message.offset}`;
          show("notes", "(some messages were missed while you were away)");
        } else if (!message.op) {         // a publication
          positions[message.channel] = `${message.epoch}:${message.offset}`;
          if (message.channel === "chat:lobby") {
            show("chat", `${message.data.from}: ${message.data.text}`);
          } else {
            show("notes", message.data.text);
          }
        }
      };
      ws.onclose = (event) => {
        // 4000: the app disconnected us (a logout); 4001: not logged in or
        // no longer; 4003: forbidden. Reconnecting would not help.
        if ([4000, 4001, 4003].includes(event.code)) {
          status(`disconnected: ${event.reason}. Reload the page.`);
          return;
        }
        status(`connection lost (${event.reason || event.code}); reconnecting…`);
        setTimeout(connect, backoff);
        backoff = Math.min(backoff * 2, 30000);
      };
    }

    document.getElementById("say").addEventListener("submit", async (event) => {
      event.preventDefault();
      const form = event.target;
      const response = await fetch("/say", {
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
      });
      if (response.ok) form.reset();
      else status(`not sent: ${(await response.json()).error}`);
    });

    connect();
  </script>
{% endif %}
</html>
"""


def page(error=None, value="", status=200):
    return (
        render_template_string(
            PAGE, name=current_user(), error=error, value=value, max_text=MAX_TEXT
        ),
        status,
    )


@app.get("/")
def index():
    return page()


@app.post("/login")
def login():
    name = request.form.get("name", "").strip()
    if not NAME.fullmatch(name):
        return page("A name is 1 to 32 letters, digits, _ or -.", value=name, status=400)
    login_id = secrets.token_urlsafe(24)
    with LOGINS_LOCK:
        LOGINS[login_id] = name
    session.clear()
    session["login"] = login_id
    return redirect("/", code=303)


@app.post("/logout")
def logout():
    name = current_user()
    with LOGINS_LOCK:
        LOGINS.pop(session.get("login"), None)
    session.clear()
    if name:
        # Close the user's open realtime connections. This logs out every
        # tab of this user, and pushgate forgets their cached grants: a tab
        # that reconnects is asked about afresh.
        try:
            pushgate("/api/disconnect", {"user": name})
        except (urllib.error.URLError, OSError, ValueError) as err:
            app.logger.warning("could not disconnect %s: %s", name, err)
    return redirect("/", code=303)


@app.post("/say")
def say():
    name = current_user()
    if not name:
        return jsonify(error="log in first"), 401
    text = request.form.get("text", "").strip()
    if not text or len(text) > MAX_TEXT:
        return jsonify(error=f"a message is 1 to {MAX_TEXT} characters"), 400
    try:
        published = pushgate(
            "/api/publish",
            {"channel": LOBBY, "event": "message", "data": {"from": name, "text": text}},
        )["results"][0]
        pushgate(
            "/api/publish",
            {
                "channel": f"user:{name}:notifications",
                "data": {"text": f"Your message #{published['offset']} reached the lobby."},
            },
        )
    except (urllib.error.URLError, OSError, ValueError, KeyError) as err:
        app.logger.warning("publishing failed: %s", err)
        return jsonify(error="the message could not be published"), 502
    return jsonify(published)


# pushgate's questions. It calls these itself, straight to the app, with the
# cookie of the browser that opened the connection (auth.upstream in
# pushgate.yaml); its JSON body says which transport and channels.


@app.post("/realtime/auth")
def realtime_auth():
    name = current_user()
    if not name:
        return jsonify(reason="log in first"), 401
    return grant(name)


@app.post("/realtime/refresh")
def realtime_refresh():
    # The same question when a grant runs out: still logged in? Anything but
    # 200 closes the connection (4001).
    name = current_user()
    if not name:
        return jsonify(reason="logged out"), 401
    return grant(name)


if __name__ == "__main__":
    if not REALTIME_API_KEY:
        print("warning: REALTIME_API_KEY is not set, so publishing will fail")
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")))
