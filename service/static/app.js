// The chat page: one task's history, live messages, sending with resend on
// reconnect, and search. It talks to the gateway that served it: Socket.IO for
// chat (websocket transport only) and the HTTP API with the bearer token.
//
// Message text always goes into the page through textContent, never innerHTML,
// so a message cannot inject markup or scripts.

const ACK_TIMEOUT_MS = 10000;
const HISTORY_PAGE = 50;
// After a reconnect, page back through history at most this far to fill the gap.
const CATCH_UP_PAGES = 10;
// Error codes that a retry can clear. Other codes would fail again.
const RETRYABLE_CODES = new Set(["rate_limited", "overloaded", "store_unavailable"]);
const TOKEN_KEY = "chat-gateway:token";

const state = {
  token: null,
  claims: null,
  jaegerUrl: null,
  maxTextChars: null,
  socket: null,
  // Every message on the page, by client_msg_id (unique within a task).
  entries: new Map(),
  nextBefore: null,
  historyLoaded: false,
};

const byId = (id) => document.getElementById(id);

function make(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

function showNotice(text) {
  const notice = byId("notice");
  notice.textContent = text;
  notice.hidden = !text;
}

// -- identifiers --------------------------------------------------------------

function randomHex(byteCount) {
  const bytes = crypto.getRandomValues(new Uint8Array(byteCount));
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

function newClientMsgId() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  // randomUUID exists only in secure contexts (https, localhost). A page opened
  // over plain http on another host builds the same version 4 UUID itself.
  const hex = randomHex(16).split("");
  hex[12] = "4";
  hex[16] = "89ab"[parseInt(hex[16], 16) & 3];
  const s = hex.join("");
  return `${s.slice(0, 8)}-${s.slice(8, 12)}-${s.slice(12, 16)}-${s.slice(16, 20)}-${s.slice(20)}`;
}

// A W3C traceparent: version 00, a 16-byte trace id, an 8-byte parent span id
// and flags 01 (sampled). The gateway's span for the message becomes its child,
// so the trace starts at the click. All-zero ids are invalid and redrawn.
function newTraceparent() {
  let traceId = randomHex(16);
  while (/^0+$/.test(traceId)) traceId = randomHex(16);
  let spanId = randomHex(8);
  while (/^0+$/.test(spanId)) spanId = randomHex(8);
  return `00-${traceId}-${spanId}-01`;
}

// -- token --------------------------------------------------------------------

// Take the token from #token= or ?token= and remove it from the address bar, so
// that copying the URL or the browser history does not leak it.
function takeTokenFromUrl() {
  const query = new URLSearchParams(location.search);
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get("token") || query.get("token");
  if (!token) return null;

  query.delete("token");
  fragment.delete("token");
  const search = query.toString();
  const hash = fragment.toString();
  const url = location.pathname + (search ? `?${search}` : "") + (hash ? `#${hash}` : "");
  history.replaceState(null, "", url);
  return token.trim();
}

// Read the claims for display only: the gateway verifies the signature.
function decodeClaims(token) {
  const parts = token.split(".");
  if (parts.length !== 3) {
    throw new Error(`a JWT has 3 dot-separated parts, not ${parts.length}`);
  }
  const base64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
  const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
  const bytes = Uint8Array.from(atob(padded), (char) => char.charCodeAt(0));
  const claims = JSON.parse(new TextDecoder().decode(bytes));
  if (typeof claims.task !== "string" || typeof claims.sub !== "string") {
    throw new Error("the token has no task or sub claim: mint one with `chat-gateway token`");
  }
  return claims;
}

function showIdentity(claims) {
  const parts = [`${claims.sub} (${claims.role}) in task ${claims.task}`];
  if (typeof claims.exp === "number") {
    const expires = new Date(claims.exp * 1000);
    const verb = expires < new Date() ? "expired" : "expires";
    parts.push(`token ${verb} ${expires.toLocaleString()}`);
  }
  byId("identity").textContent = parts.join(" · ");
}

// -- HTTP API -----------------------------------------------------------------

async function getJson(path, { auth = true } = {}) {
  const headers = auth ? { Authorization: `Bearer ${state.token}` } : {};
  const response = await fetch(path, { headers });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = body?.error ?? {
      code: `http_${response.status}`,
      message: `${path} returned HTTP ${response.status}`,
    };
    throw Object.assign(new Error(error.message), { code: error.code });
  }
  return body;
}

async function loadConfig() {
  try {
    const config = await getJson("/api/config", { auth: false });
    state.jaegerUrl = httpUrlOrNull(config.jaeger_ui_url);
    state.maxTextChars = config.max_text_chars;
  } catch (error) {
    // The page works without it: trace ids show without links.
    console.warn("GET /api/config failed", error);
  }
}

function httpUrlOrNull(value) {
  if (!value) return null;
  try {
    const url = new URL(value);
    const web = url.protocol === "http:" || url.protocol === "https:";
    return web ? value.replace(/\/+$/, "") : null;
  } catch {
    return null;
  }
}

function historyPath(before) {
  const params = new URLSearchParams({ limit: String(HISTORY_PAGE) });
  if (before) params.set("before", before);
  return `/api/tasks/${encodeURIComponent(state.claims.task)}/messages?${params}`;
}

// The first load shows the newest page. After a reconnect, page back until a
// message seen before the outage turns up, so nothing missed is left out.
async function loadHistory() {
  const known = new Set([...state.entries.values()].map((entry) => entry.id).filter(Boolean));
  let before = null;
  try {
    for (let page = 0; page < CATCH_UP_PAGES; page += 1) {
      const body = await getJson(historyPath(before));
      body.messages.forEach(applyMessage);
      if (!state.historyLoaded) {
        state.historyLoaded = true;
        setNextBefore(body.next_before);
        return;
      }
      if (!body.next_before || body.messages.some((message) => known.has(message.id))) return;
      before = body.next_before;
    }
  } catch (error) {
    showNotice(`Reading the history failed: ${error.code}: ${error.message}`);
  }
}

async function loadOlder() {
  try {
    const body = await getJson(historyPath(state.nextBefore));
    body.messages.forEach(applyMessage);
    setNextBefore(body.next_before);
  } catch (error) {
    showNotice(`Reading older messages failed: ${error.code}: ${error.message}`);
  }
}

function setNextBefore(value) {
  state.nextBefore = value;
  byId("older").hidden = !value;
}

// -- messages -----------------------------------------------------------------

// One message on the page. Its state is "sending" until an ack or the message
// event arrives, then "saved" or "failed". attempt and inFlight count the emits
// of its client_msg_id, which all carry the same id and traceparent.
function newEntry(fields) {
  const entry = {
    clientMsgId: fields.clientMsgId,
    text: fields.text,
    sender: fields.sender,
    role: fields.role,
    state: fields.state,
    id: null,
    createdAt: null,
    localTime: fields.localTime ?? new Date().toISOString(),
    traceparent: fields.traceparent ?? null,
    duplicate: false,
    error: null,
    attempt: 0,
    inFlight: false,
  };
  entry.element = buildElement(entry);
  state.entries.set(entry.clientMsgId, entry);
  return entry;
}

function buildElement(entry) {
  const item = make("li", "message");
  const meta = make("div", "meta");
  const status = make("div", "status");
  const retry = make("button", "retry", "Retry");
  retry.type = "button";
  retry.addEventListener("click", () => resend(entry));

  const parts = {
    sender: make("span", "sender"),
    role: make("span", "role"),
    time: make("time"),
    text: make("p", "text"),
    state: make("span", "state"),
    error: make("span", "error"),
    trace: make("span", "trace"),
    retry,
  };
  meta.append(parts.sender, parts.role, parts.time);
  status.append(parts.state, parts.error, parts.trace, parts.retry);
  item.append(meta, parts.text, status);
  entry.parts = parts;
  return item;
}

function traceIdOf(entry) {
  return entry.traceparent ? entry.traceparent.split("-")[1] : null;
}

function stateLabel(entry) {
  if (entry.state === "saved") return entry.duplicate ? "saved (resent, stored once)" : "saved";
  if (entry.state === "failed") return "failed";
  return state.socket?.connected ? "sending" : "sending (waiting for the connection)";
}

function render(entry) {
  const { element, parts } = entry;
  const mine = entry.sender === state.claims.sub;
  element.classList.toggle("mine", mine);
  element.dataset.state = entry.state;
  element.dataset.sender = entry.sender;
  element.dataset.clientMsgId = entry.clientMsgId;
  element.dataset.duplicate = String(entry.duplicate);

  parts.sender.textContent = entry.sender;
  parts.role.textContent = entry.role;
  const time = entry.createdAt ?? entry.localTime;
  parts.time.dateTime = time;
  parts.time.textContent = new Date(time).toLocaleTimeString();
  parts.text.textContent = entry.text;
  parts.state.textContent = stateLabel(entry);
  parts.error.textContent = entry.error ? `${entry.error.code}: ${entry.error.message}` : "";
  parts.error.dataset.code = entry.error?.code ?? "";
  parts.retry.hidden = !(entry.state === "failed" && RETRYABLE_CODES.has(entry.error?.code));
  renderTrace(parts.trace, traceIdOf(entry));
}

function renderTrace(container, traceId) {
  container.replaceChildren();
  if (!traceId) return;
  container.append("trace ");
  if (state.jaegerUrl) {
    const link = make("a", "trace-id", traceId);
    link.href = `${state.jaegerUrl}/trace/${traceId}`;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    link.title = "Open this message's trace in Jaeger";
    container.append(link);
  } else {
    container.append(make("code", "trace-id", traceId));
  }
}

// Saved messages sort by the gateway's created_at; unsaved ones by the time
// they were sent from this page. Both are ISO 8601 strings in UTC.
function sortKey(entry) {
  return `${entry.createdAt ?? entry.localTime} ${entry.id ?? entry.clientMsgId}`;
}

function place(entry) {
  const list = byId("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const key = sortKey(entry);
  entry.element.dataset.sortKey = key;

  let before = null;
  for (let node = list.lastElementChild; node; node = node.previousElementSibling) {
    if (node === entry.element) continue;
    if (node.dataset.sortKey <= key) break;
    before = node;
  }
  if (entry.element.nextElementSibling !== before || !entry.element.isConnected) {
    list.insertBefore(entry.element, before);
  }
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function update(entry) {
  render(entry);
  place(entry);
}

// A stored message, from history or the message event. It settles the entry of
// the same client_msg_id, because the gateway stores each id once per task.
function applyMessage(view) {
  const entry =
    state.entries.get(view.client_msg_id) ??
    newEntry({
      clientMsgId: view.client_msg_id,
      text: view.text,
      sender: view.sender,
      role: view.role,
      state: "saved",
    });
  const wasPending = entry.state === "sending";
  Object.assign(entry, {
    text: view.text,
    sender: view.sender,
    role: view.role,
    id: view.id,
    createdAt: view.created_at,
    state: "saved",
    error: null,
  });
  update(entry);
  if (wasPending) savePending();
}

// -- sending ------------------------------------------------------------------

function transmit(entry) {
  const socket = state.socket;
  // Emit only on a live connection: socket.io-client would otherwise buffer the
  // packet and send it on reconnect as well as the resend below.
  if (!socket?.connected || entry.inFlight || entry.state !== "sending") return;
  entry.attempt += 1;
  entry.inFlight = true;
  const attempt = entry.attempt;
  const payload = {
    client_msg_id: entry.clientMsgId,
    text: entry.text,
    traceparent: entry.traceparent,
  };
  socket.timeout(ACK_TIMEOUT_MS).emit("send_message", payload, (error, ack) => {
    onAck(entry, attempt, error, ack);
  });
}

function onAck(entry, attempt, error, ack) {
  if (attempt === entry.attempt) entry.inFlight = false;
  if (entry.state !== "sending") return; // the message event or another attempt settled it
  if (error) {
    // No ack, because of a timeout or a disconnect. The message stays pending.
    // After a timeout on a live socket it is resent now, else on the next connect.
    if (attempt === entry.attempt && state.socket.connected) transmit(entry);
    render(entry);
    return;
  }
  if (ack?.ok) {
    Object.assign(entry, {
      state: "saved",
      id: ack.id,
      createdAt: ack.created_at,
      duplicate: Boolean(ack.duplicate),
    });
  } else {
    const failure = ack?.error ?? {
      code: "invalid_ack",
      message: `the gateway sent an ack without ok or error: ${JSON.stringify(ack)}`,
    };
    Object.assign(entry, { state: "failed", error: failure });
  }
  update(entry);
  savePending();
}

function send(text) {
  const entry = newEntry({
    clientMsgId: newClientMsgId(),
    text,
    sender: state.claims.sub,
    role: state.claims.role,
    state: "sending",
    traceparent: newTraceparent(),
  });
  update(entry);
  savePending();
  transmit(entry);
}

// Retry a failed message with the same client_msg_id and traceparent, so a
// message the gateway did store after all is acked as a duplicate, not doubled.
function resend(entry) {
  Object.assign(entry, { state: "sending", error: null });
  update(entry);
  savePending();
  transmit(entry);
}

function resendPending() {
  for (const entry of state.entries.values()) {
    if (entry.state === "sending") {
      transmit(entry);
      render(entry);
    }
  }
}

// -- unacked messages survive a reload ----------------------------------------

function pendingKey() {
  return `chat-gateway:pending:${state.claims.task}:${state.claims.sub}`;
}

function savePending() {
  const pending = [...state.entries.values()]
    .filter((entry) => entry.state === "sending")
    .map((entry) => ({
      client_msg_id: entry.clientMsgId,
      text: entry.text,
      traceparent: entry.traceparent,
      local_time: entry.localTime,
    }));
  try {
    if (pending.length) localStorage.setItem(pendingKey(), JSON.stringify(pending));
    else localStorage.removeItem(pendingKey());
  } catch (error) {
    // Storage full or disabled: the messages stay pending in memory.
    console.warn("saving unacked messages to localStorage failed", error);
  }
}

function restorePending() {
  let saved = [];
  try {
    saved = JSON.parse(localStorage.getItem(pendingKey()) ?? "[]");
  } catch (error) {
    console.warn("ignoring unreadable unacked messages in localStorage", error);
  }
  for (const item of Array.isArray(saved) ? saved : []) {
    if (typeof item?.client_msg_id !== "string" || typeof item.text !== "string") continue;
    const entry = newEntry({
      clientMsgId: item.client_msg_id,
      text: item.text,
      sender: state.claims.sub,
      role: state.claims.role,
      state: "sending",
      traceparent: typeof item.traceparent === "string" ? item.traceparent : newTraceparent(),
      localTime: item.local_time,
    });
    update(entry);
  }
}

// -- connection ---------------------------------------------------------------

function setConnection(kind, text) {
  const element = byId("connection");
  element.dataset.state = kind;
  element.textContent = text;
}

function connect() {
  if (typeof io !== "function") {
    setConnection("rejected", "no Socket.IO client");
    showNotice(
      "The Socket.IO client did not load from /static/vendor/socket.io.min.js: " +
        "run `npm ci` on the gateway's host.",
    );
    return;
  }
  const socket = io({
    transports: ["websocket"],
    auth: { token: state.token },
    reconnectionDelay: 500,
    reconnectionDelayMax: 5000,
  });
  state.socket = socket;

  socket.on("connect", () => {
    setConnection("connected", "connected");
    showNotice("");
    resendPending();
    loadHistory();
  });
  socket.on("disconnect", (reason) => {
    setConnection("offline", `disconnected (${reason}); reconnecting`);
    // The gateway closed this socket on purpose. socket.io-client does not
    // reconnect by itself then, but unacked messages still need a connection.
    if (reason === "io server disconnect") socket.connect();
    for (const entry of state.entries.values()) {
      if (entry.state === "sending") render(entry);
    }
  });
  socket.on("connect_error", (error) => {
    if (socket.active) {
      setConnection("offline", `cannot reach the gateway (${error.message}); retrying`);
      return;
    }
    // The gateway rejected the token or has too many sockets. socket.io-client
    // does not retry a rejected connect, so the page says what to fix.
    const code = error.data?.code ?? "rejected";
    setConnection("rejected", `connection rejected: ${code}`);
    showNotice(`The gateway rejected the connection: ${code}: ${error.message}`);
  });
  socket.on("message", applyMessage);
}

// -- composer and search ------------------------------------------------------

function updateCount() {
  const length = [...byId("text").value].length; // code points, as the gateway counts
  const count = byId("count");
  count.textContent = state.maxTextChars ? `${length} / ${state.maxTextChars}` : String(length);
  count.classList.toggle("over", Boolean(state.maxTextChars) && length > state.maxTextChars);
}

function wireComposer() {
  const form = byId("composer");
  const input = byId("text");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value;
    if (!text.trim()) return;
    send(text);
    input.value = "";
    updateCount();
    input.focus();
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  input.addEventListener("input", updateCount);
  updateCount();
}

function renderResult(result) {
  const { message } = result;
  const item = make("li", "result");
  const meta = make("div", "meta");
  meta.append(
    make("span", "score", result.score.toFixed(2)),
    make("span", "sender", message.sender),
    make("span", "role", message.role),
    make("time", null, new Date(message.created_at).toLocaleString()),
  );
  item.append(meta, make("p", "text", message.text));
  return item;
}

function wireSearch() {
  byId("search-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const query = byId("query").value.trim();
    const status = byId("search-status");
    const results = byId("results");
    if (!query) return;
    status.textContent = "Searching…";
    results.replaceChildren();
    try {
      const params = new URLSearchParams({ q: query, task: state.claims.task, limit: "10" });
      const body = await getJson(`/api/search?${params}`);
      const count = body.results.length;
      status.textContent = `${count} result${count === 1 ? "" : "s"} for “${query}”`;
      results.append(...body.results.map(renderResult));
    } catch (error) {
      status.textContent = `Search failed: ${error.code}: ${error.message}`;
    }
  });
}

function wireTokenForm() {
  byId("token-panel").hidden = false;
  byId("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = byId("token-input").value.trim();
    try {
      decodeClaims(token);
    } catch (error) {
      byId("token-error").textContent = `This is not a chat token: ${error.message}`;
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    location.reload();
  });
}

// -- start --------------------------------------------------------------------

async function start() {
  const fromUrl = takeTokenFromUrl();
  if (fromUrl) sessionStorage.setItem(TOKEN_KEY, fromUrl);
  const token = fromUrl || sessionStorage.getItem(TOKEN_KEY);

  byId("change-token").addEventListener("click", () => {
    state.socket?.close();
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  if (!token) {
    wireTokenForm();
    return;
  }
  try {
    state.claims = decodeClaims(token);
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    wireTokenForm();
    byId("token-error").textContent = `The saved token is not a chat token: ${error.message}`;
    return;
  }

  state.token = token;
  showIdentity(state.claims);
  byId("change-token").hidden = false;
  byId("chat").hidden = false;
  byId("older").addEventListener("click", loadOlder);
  await loadConfig();
  wireComposer();
  wireSearch();
  restorePending();
  setConnection("connecting", "connecting");
  connect();
}

start();
