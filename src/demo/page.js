// The demo page: the lobby's history from the app, then live publications
// through pushgate's client library, served by pushgate itself.
import { connect } from "/realtime/client.js";

const LOBBY = "chat:lobby";
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

function render(envelope) {
  if (envelope.epoch == shown.epoch && envelope.offset <= shown.offset) return;
  shown = { epoch: envelope.epoch, offset: envelope.offset };
  const { from, text } = envelope.data;
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
  client.on("reset", async ({ channel }) => {
    event(`reset on ${channel}: history could not cover the gap; reloading`, "reset");
    if (channel == LOBBY) await loadLobby();
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
  client.subscribe(`user:${me}:notifications`, ({ from, text }) => add("notes", `${from}: ${text}`));

  $("say").addEventListener("submit", (e) => {
    e.preventDefault();
    post("/say", e.target);
  });
  $("notify").addEventListener("submit", (e) => {
    e.preventDefault();
    post("/notify", e.target);
  });
}
