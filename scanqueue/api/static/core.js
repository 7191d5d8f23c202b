// scanqueue console (docs/reference.md#console) — the shared core: constants, the page's state,
// small DOM helpers, the API client and the token. Plain JavaScript modules, no build
// step, no third-party code; every value from the server is put into the page as text
// (textContent), never as markup. main.js wires the views (scans.js, scan.js, queue.js,
// schedules.js) to the router and the live stream.

const API = "/api/v1";
const STATUSES = ["queued", "running", "completed", "failed", "canceled"];
const ACTIVE = new Set(["queued", "running"]);
const STATUS_OF = {"scan.queued": "queued", "scan.started": "running",
                   "scan.completed": "completed", "scan.failed": "failed",
                   "scan.canceled": "canceled", "scan.requeued": "queued"};
const PAGE_SIZE = 50;
const BULK_MAX = 1000;          // scans one bulk action touches at most
const TOKEN_KEY = "scanqueue-token";

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  needsToken: false,
  view: "scans",
  scanId: null,
  filters: {status: "", key: "", text: ""},
  offset: 0,
  nextOffset: null,
  scans: new Map(),       // id -> scan shown in the list
  scan: null,             // the scan of the scan view
  worker: undefined,      // the worker that ran it (null: none; undefined: not read yet)
  timelineIds: new Set(),
  findingsOffset: 0,
  stream: null,
  lastEventId: "",
  pollTimer: null,
};


// -- small helpers ------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const list = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = String(v);
    else if (k === "className") node.className = v;
    else if (k === "onclick") node.addEventListener("click", v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function when(iso) {
  return iso ? iso.replace("T", " ").slice(0, 19) : "";
}

function ago(iso) {
  if (!iso) return "";
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (s < 0) return "in " + duration(-s);
  return duration(s) + " ago";
}

function duration(s) {
  if (s < 90) return s + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  if (s < 172800) return Math.round(s / 3600) + " h";
  return Math.round(s / 86400) + " d";
}

function scanLink(id, short) {
  return el("a", {href: "/scans/" + encodeURIComponent(id), "data-nav": true,
                  title: id, text: short ? id.slice(0, 12) : id});
}

function setError(message) { $("error").textContent = message || ""; }
function setNotice(message) {
  $("notice").textContent = message || "";
  if (message) setTimeout(() => { if ($("notice").textContent === message) $("notice").textContent = ""; }, 6000);
}

function unavailable(what, error) {
  return el("p", {className: "unavailable", role: "note"},
    what + " is not available from this server" +
    (error && error.status === 404 ? " (its API answered 404: this version does not have it yet)." :
     error ? ": " + error.message : "."));
}


// -- the API ----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h["Authorization"] = "Bearer " + state.token;
  return h;
}

async function api(path, options) {
  // No cookies: the Authorization header is the only credential (docs/reference.md#http-api).
  const opts = Object.assign({credentials: "omit"}, options || {});
  opts.headers = authHeaders(opts.headers);
  if (opts.json !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(opts.json);
    delete opts.json;
  }
  let response;
  try { response = await fetch(API + path, opts); }
  catch (e) { throw new ApiError(0, "the server cannot be reached"); }
  if (response.status === 401) {
    askForToken(state.token ? "That token was refused." : "");
    throw new ApiError(401, "an API token is required");
  }
  if (response.status === 204) return {};
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const details = (body.details || []).map((d) => d.field + ": " + d.message).join("; ");
    throw new ApiError(response.status,
      (body.error || response.statusText) + (details ? " (" + details + ")" : ""));
  }
  return body;
}


// -- auth: the token stays in this tab (sessionStorage), sent only as a header -----------------

function askForToken(message) {
  state.needsToken = true;
  $("auth").style.display = "flex";
  $("auth-error").textContent = message || "";
  setConn("down", "needs a token");
}


// -- the stream badge ------------------------------------------------------------------------

function setConn(kind, text) {
  const c = $("conn");
  c.textContent = text;
  c.className = kind === "ok" ? "ok" : "down";
  c.dataset.state = kind === "ok" ? "live" : (text === "needs a token" ? "auth" : "retrying");
}


// -- shared pieces of the views ---------------------------------------------------------------

function confirmDialog(text, yesLabel) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  $("confirm-yes").textContent = yesLabel;
  dialog.returnValue = "";
  dialog.showModal();
  $("confirm-no").focus();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), {once: true});
  });
}

function table(caption, head, rows, id) {
  return el("div", {className: "table-wrap"}, el("table", {id},
    el("caption", {text: caption}),
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {scope: "col", text: h})))),
    el("tbody", {}, ...(rows.length ? rows : [el("tr", {}, el("td", {colspan: head.length, className: "muted", text: "None."}))]))));
}

function retryBody(scan) {
  // A new scan with the same providers, frameworks and key (docs/reference.md#console).
  const body = {providers: scan.providers_scanned || [], frameworks: scan.frameworks_scanned || []};
  if (scan.scan_key) body.key = scan.scan_key;
  if (scan.priority) body.priority = scan.priority;
  if (scan.timeout_seconds) body.timeout_seconds = scan.timeout_seconds;
  if (scan.triggered_by_user) body.user = scan.triggered_by_user;
  const labels = Object.assign({}, scan.labels && typeof scan.labels === "object" ? scan.labels : {});
  labels.retry_of = scan.id;
  body.labels = labels;
  return body;
}

async function cancelScan(id) {
  // queued|running -> canceled; the scan, or null after saying why.
  try {
    const scan = await api("/scans/" + encodeURIComponent(id) + "/cancel", {method: "POST"});
    setNotice("Canceled scan " + id + ".");
    return scan;
  } catch (e) { setError(e.message); return null; }
}

async function retryScan(scan) {
  // Enqueues a copy; the new scan, or null after saying why.
  try { return await api("/scans", {method: "POST", json: retryBody(scan)}); }
  catch (e) { setError("retry of " + scan.id + " failed: " + e.message); return null; }
}

// -- moving between views (main.js installs the router) ----------------------------------------

const router = {route: () => {}};

function setRouter(route) { router.route = route; }

function go(href) {
  // Another address of this page: no reload.
  if (href === location.pathname + location.search) return;
  history.pushState(null, "", href);
  router.route();
}

function navigate(href) {
  go(href);
  $("view").focus({preventScroll: true});
}

async function primeCursor() {
  // Subscribe from where the stream stands now, so that even a first connection that
  // drops before any event arrives resumes without a gap (a 401 asks for the token).
  try {
    const a = await api("/activity?minutes=1");
    if (!state.lastEventId && a.last_event_id) state.lastEventId = a.last_event_id;
  } catch (e) { /* askForToken on a 401; otherwise the stream starts from now */ }
}

export {
  $,
  API,
  STATUSES,
  ACTIVE,
  STATUS_OF,
  PAGE_SIZE,
  BULK_MAX,
  TOKEN_KEY,
  state,
  list,
  el,
  when,
  ago,
  duration,
  scanLink,
  setError,
  setNotice,
  unavailable,
  ApiError,
  authHeaders,
  api,
  askForToken,
  setConn,
  confirmDialog,
  table,
  retryBody,
  cancelScan,
  retryScan,
  router,
  setRouter,
  go,
  navigate,
  primeCursor,
};
