// The demo page: the lobby's history from the app, then live publications
// through pushgate's client library, served by pushgate itself. The page
// also publishes itself (who is typing) and calls the app (who is online)
// over the library's WebSocket.
import { connect } from "/realtime/client.js";

const LOBBY = "chat:lobby";
const TYPING = "typing:lobby";
// A page says it is typing at most this often, and shows others as typing
// for this long after their last word.
const TYPING_EVERY = 1000;
const TYPING_SHOWN = 3000;
const $ = (id) => document.getElementById(id);

function item(text, attributes = {}) {
  const li = document.createElement("li");
  li.textContent = text; // text, never HTML: what users type stays text
  for (const [name, value] of Object.entries(attributes)) li.setAttribute(name, value);
  return li;
}

const add = (list, text, attributes) => $(list).append(item(text, attributes));

function event(text, className) {
  const time = new Date().toLocaleTimeString();
  $("events").prepend(item(`${time} ${text}`, className ? { class: className } : {}));
  while ($("events").children.length > 100) $("events").lastChild.remove();
}

// The lobby as shown: rendered up to this position, so a publication that
// both the history and the live stream carry shows once.
let shown = { epoch: "", offset: 0 };

// Who is typing: user -> when this page last heard so (the demo runs on
// one machine, so pages' clocks agree).
const typing = new Map();

function showTyping() {
  const now = Date.now();
  for (const [user, at] of typing) if (now - at > TYPING_SHOWN) typing.delete(user);
  const who = [...typing.keys()].sort();
  $("typing").textContent = who.length ? `${who.join(", ")} ${who.length > 1 ? "are" : "is"} typing…` : "";
  document.body.dataset.typing = who.join(",");
}

function render(envelope) {
  if (envelope.epoch == shown.epoch && envelope.offset <= shown.offset) return;
  shown = { epoch: envelope.epoch, offset: envelope.offset };
  const { from, text } = envelope.data;
  typing.delete(from);
  showTyping();
  add("messages", `${from}: ${text}`, { "data-offset": envelope.offset });
}

// The app's state for the lobby: its recent history, and the position it
// reaches, from which the live stream continues.
async function loadLobby() {
  const history = await (await fetch("/history")).json();
  $("messages").replaceChildren();
  shown = { epoch: history.epoch, offset: 0 };
  history.messages.forEach(render);
  shown = { epoch: history.epoch, offset: history.offset };
  return `${history.epoch}:${history.offset}`;
}

async function post(path, form) {
  const response = await fetch(path, { method: "POST", body: new URLSearchParams(new FormData(form)) });
  if (response.ok) form.reset();
  else {
    const error = (await response.json().catch(() => ({}))).error;
    event(`not sent: ${error?.message ?? error ?? response.status}`);
  }
}

const me = (await (await fetch("/me")).json()).user;
if (!me) {
  $("login").hidden = false;
} else {
  $("chat").hidden = false;
  $("me").textContent = me;
  const NOTES = `user:${me}:notifications`;
  const since = await loadLobby();
  const client = connect("/realtime", { positions: { [LOBBY]: since } });
  window.pushgateDemo = { client };

  client.on("state", ({ state, transport, code, reason, delay }) => {
    document.body.dataset.state = state;
    document.body.dataset.transport = transport;
    $("state").textContent = state;
    $("transport").textContent = transport;
    let text = `${state} (${transport})`;
    if (code) text += `: ${code}${reason ? ` ${reason}` : ""}`;
    if (delay != null) text += `; retrying in ${Math.round(delay)} ms`;
    event(text);
  });
  client.on("fallback", ({ transport }) => event(`falling back to ${transport}`));
  // A reset: pushgate's history could not cover the gap (after a restart
  // on the memory engine, everything). Each channel is put right its own
  // way, and the page says which.
  client.on("reset", async ({ channel }) => {
    if (channel == LOBBY) {
      event(`reset on ${channel}: history could not cover the gap; the lobby is reloaded from the app`, "reset");
      await loadLobby();
    } else if (channel == NOTES) {
      // Only pushgate had them: what came while away is lost, and the
      // list says where.
      event(`reset on ${channel}: notifications sent while away are lost; the line marks the gap`, "reset");
      add("notes", "— notifications may be missing here —", { class: "gap" });
    } else {
      event(`reset on ${channel}: nothing to reload (who is typing is not kept)`, "reset");
    }
    document.body.dataset.resets = Number(document.body.dataset.resets || 0) + 1;
  });
  client.on("error", ({ channel, message }) => event(`${channel}: ${message}`));

  // Publications the library handed over, for the curious (and the tests):
  // each arrives once, whatever the transport did.
  let delivered = 0;
  client.subscribe(LOBBY, (data, envelope) => {
    document.body.dataset.delivered = ++delivered;
    render(envelope);
  });
  client.subscribe(NOTES, ({ from, text }) => add("notes", `${from}: ${text}`));

  // Typing: pages publish on TYPING themselves; pushgate adds `user`, so a
  // page cannot type in another's name. A resumed connection replays what
  // it missed: old news by its `at`, not shown.
  client.subscribe(TYPING, (data, { user }) => {
    // Any page may publish here: anything but a recent {at} is not shown,
    // and what is shown lasts by this page's clock.
    const at = data && data.at;
    if (user == me || !(Math.abs(Date.now() - at) < TYPING_SHOWN)) return;
    typing.set(user, Date.now());
    showTyping();
  });
  setInterval(showTyping, 500);
  let typed = 0;
  let typingError;
  $("say").elements.text.addEventListener("input", () => {
    if (Date.now() - typed < TYPING_EVERY) return;
    typed = Date.now();
    client.publish(TYPING, { at: typed }, { event: "typing" }).then(
      () => (typingError = undefined),
      ({ code, message }) => {
        // Said once, not at every key (e.g. needs_websocket after a fallback).
        if (code != typingError) event(`typing not shown to others: ${message} (${code})`);
        typingError = code;
      },
    );
  });

  // Who is online: the page asks the app (rpc), which asks pushgate's presence.
  async function online() {
    try {
      const { users } = await client.rpc("online");
      $("online").textContent = users.length ? users.join(", ") : "nobody";
      document.body.dataset.online = users.join(",");
      document.body.dataset.onlineAnswers = Number(document.body.dataset.onlineAnswers || 0) + 1;
    } catch ({ code, message }) {
      $("online").textContent = `the app could not say: ${message} (${code})`;
    }
  }
  $("who").addEventListener("click", online);
  client.on("state", ({ state }) => state == "connected" && online());

  $("say").addEventListener("submit", (e) => {
    e.preventDefault();
    post("/say", e.target);
  });
  $("notify").addEventListener("submit", (e) => {
    e.preventDefault();
    post("/notify", e.target);
  });
}
