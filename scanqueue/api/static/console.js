// scanqueue console (CONTRACT §10): one page, four views, live through /api/v1/events.
// Plain JavaScript, no build step, no third-party code. Every value from the server
// is put into the page as text (textContent), never as markup.
"use strict";

const API = "/api/v1";
const STATUSES = ["queued", "running", "completed", "failed", "canceled"];
const ACTIVE = new Set(["queued", "running"]);
const STATUS_OF = {"scan.queued": "queued", "scan.started": "running",
                   "scan.completed": "completed", "scan.failed": "failed",
                   "scan.canceled": "canceled", "scan.requeued": "queued"};
const PAGE_SIZE = 50;
const BULK_MAX = 1000;          // scans one bulk action touches at most
const SESSION_RENEW_MS = 20 * 60 * 1000;  // the cookie lives an hour
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
  timelineIds: new Set(),
  findingsOffset: 0,
  stream: null,
  lastEventId: "",
  retryTimer: null,
  pollTimer: null,
  renewTimer: null,
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
  const opts = Object.assign({credentials: "same-origin"}, options || {});
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

// -- auth: the token stays in this tab; the stream rides on a short-lived cookie ---------------

function askForToken(message) {
  state.needsToken = true;
  $("auth").style.display = "flex";
  $("auth-error").textContent = message || "";
  setConn("down", "needs a token");
}

async function openSession() {
  // Trades the bearer token for an HttpOnly cookie (an HMAC of an expiry, not the token)
  // that the server accepts on reads only, so the EventSource can authenticate.
  if (!state.token) return;
  await api("/session", {method: "POST"});
}

$("auth").addEventListener("submit", async (e) => {
  e.preventDefault();
  const given = $("token").value.trim();
  if (!given) return;
  state.token = given;
  try {
    await openSession();
  } catch (err) {
    state.token = "";
    $("auth-error").textContent = err.status === 401 ? "That token was refused." : err.message;
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, given);
  $("token").value = "";
  $("auth").style.display = "none";
  $("signout").hidden = false;
  state.needsToken = false;
  startRenewing();
  await primeCursor();
  connect();
  route();
});

$("signout").addEventListener("click", async () => {
  try { await api("/session", {method: "DELETE"}); } catch (e) { /* gone already */ }
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = "";
  $("signout").hidden = true;
  if (state.stream) state.stream.close();
  askForToken("");
});

function startRenewing() {
  clearInterval(state.renewTimer);
  state.renewTimer = setInterval(() => openSession().catch(() => {}), SESSION_RENEW_MS);
}

// -- the live stream -------------------------------------------------------------------------

function setConn(kind, text) {
  const c = $("conn");
  c.textContent = text;
  c.className = kind === "ok" ? "ok" : "down";
  c.dataset.state = kind === "ok" ? "live" : (text === "needs a token" ? "auth" : "retrying");
}

function connect() {
  clearTimeout(state.retryTimer);
  if (state.stream) state.stream.close();
  // A fresh EventSource resumes from the last event seen (the browser's own retries
  // send Last-Event-ID themselves); an event id is no secret, so the query is fine.
  const url = API + "/events" + (state.lastEventId ?
    "?last_event_id=" + encodeURIComponent(state.lastEventId) : "");
  const stream = new EventSource(url, {withCredentials: true});
  state.stream = stream;
  stream.onopen = () => {
    setConn("ok", "live");
    refreshView();          // whatever happened while disconnected
  };
  stream.onerror = () => {
    if (stream !== state.stream) return;
    setConn("down", "disconnected, retrying…");
    if (stream.readyState === EventSource.CLOSED) {
      // The server answered but not with a stream (401 after the cookie expired, 503
      // when full): renew the session and start again, a little later each time.
      state.retryTimer = setTimeout(async () => {
        try { await openSession(); } catch (e) { if (e.status === 401) return; }
        connect();
      }, 3000);
    }
  };
  stream.onmessage = (message) => {
    if (message.lastEventId) state.lastEventId = message.lastEventId;
    let event;
    try { event = JSON.parse(message.data); } catch (e) { return; }
    onEvent(event);
  };
}

function onEvent(event) {
  logEvent(event);
  const known = state.scans.get(event.scan_id);
  if (known && STATUS_OF[event.type]) {
    known.status = STATUS_OF[event.type];
    if (event.type === "scan.started") { known.attempts = event.attempt; known.error = null; }
    if (typeof event.findings_count === "number") known.findings_count = event.findings_count;
    renderRow(known);
    if (event.type !== "scan.started" && event.type !== "scan.queued") refreshRow(event.scan_id);
  } else if (!known && state.view === "scans" && STATUS_OF[event.type]) {
    refreshRow(event.scan_id);
  }
  if (state.view === "scan" && event.scan_id === state.scanId) {
    addTimeline(event);
    if (STATUS_OF[event.type] || event.type === "scan.finding") loadScan(false);
  }
  if (state.view === "schedules" && event.type.startsWith("schedule.")) loadSchedules();
  if (state.view === "queue" && STATUS_OF[event.type]) scheduleQueueRefresh();
}

function logEvent(event) {
  const log = $("events");
  const extra = Object.assign({}, event);
  for (const k of ["id", "type", "scan_id", "at"]) delete extra[k];
  const line = `${(event.at || "").slice(11, 23)} ${event.type} ${(event.scan_id || "").slice(0, 12)} ` +
    JSON.stringify(extra) + "\n";
  log.textContent = (line + log.textContent).slice(0, 20000);
}

// -- routing ------------------------------------------------------------------------------------

function route() {
  const path = location.pathname;
  const m = path.match(/^\/scans\/([^/]+)$/);
  state.view = m ? "scan" : path === "/queue" ? "queue" : path === "/schedules" ? "schedules" : "scans";
  state.scanId = m ? decodeURIComponent(m[1]) : null;
  for (const v of ["scans", "scan", "queue", "schedules"]) $("view-" + v).hidden = v !== state.view;
  for (const a of document.querySelectorAll("nav a[data-view]")) {
    const current = a.dataset.view === state.view || (state.view === "scan" && a.dataset.view === "scans");
    if (current) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  setError("");
  if (state.view === "scans") readFilters();
  if (state.view === "scan") {
    state.scan = null;
    state.timelineIds = new Set();
    $("timeline").replaceChildren();
    $("findings").replaceChildren();
    $("scan-title").textContent = "Scan " + state.scanId;
    document.title = "scan " + state.scanId.slice(0, 12) + " · scanqueue";
  } else {
    document.title = (state.view === "scans" ? "" : state.view + " · ") + "scanqueue";
  }
  refreshView(true);
}

function refreshView(first) {
  if (state.needsToken) return;
  if (state.view === "scans") { loadScans(); loadActivity(); }
  else if (state.view === "scan") { loadScan(true); }
  else if (state.view === "queue") loadQueue();
  else if (state.view === "schedules") loadSchedules();
  clearInterval(state.pollTimer);
  // The stream says what changes; a slow poll catches rows other programs insert and
  // keeps heartbeats and the chart current.
  const every = state.view === "queue" ? 3000 : 8000;
  state.pollTimer = setInterval(() => {
    if (state.needsToken || document.hidden) return;
    if (state.view === "scans") { loadScans(); loadActivity(); }
    else if (state.view === "queue") loadQueue();
    else if (state.view === "schedules") loadSchedules();
  }, every);
}

function navigate(href) {
  if (href === location.pathname + location.search) return;
  history.pushState(null, "", href);
  route();
  $("view").focus({preventScroll: true});
}

document.addEventListener("click", (e) => {
  const a = e.target.closest && e.target.closest("a[data-nav]");
  if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey) return;
  e.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", route);

// -- scans ------------------------------------------------------------------------------------

function readFilters() {
  const q = new URLSearchParams(location.search);
  state.filters = {status: q.get("status") || "", key: q.get("key") || "", text: q.get("q") || ""};
  state.offset = Number(q.get("offset") || 0) || 0;
  $("f-status").value = state.filters.status;
  $("f-key").value = state.filters.key;
  $("f-text").value = state.filters.text;
}

function filterQuery(offset, limit) {
  const q = new URLSearchParams();
  if (state.filters.status) q.set("status", state.filters.status);
  if (state.filters.key) q.set("key", state.filters.key);
  if (state.filters.text) q.set("q", state.filters.text);
  q.set("limit", String(limit || PAGE_SIZE));
  q.set("offset", String(offset || 0));
  return q;
}

function matchesText(scan) {
  // The server filters by text; the same test here keeps rows that arrive live honest.
  const t = state.filters.text.toLowerCase();
  if (!t) return true;
  return [scan.id, scan.triggered_by_user, scan.error, scan.key,
          (scan.providers_scanned || []).join(","), (scan.frameworks_scanned || []).join(",")]
    .some((v) => v && String(v).toLowerCase().includes(t));
}

function matchesFilters(scan) {
  if (state.filters.status && scan.status !== state.filters.status) return false;
  if (state.filters.key && scan.key && scan.key !== state.filters.key) return false;
  return matchesText(scan);
}

async function loadScans() {
  try {
    const page = await api("/scans?" + filterQuery(state.offset).toString());
    const rows = page.scans.filter(matchesFilters);
    state.nextOffset = page.next_offset;
    state.scans = new Map(rows.map((s) => [s.id, s]));
    const body = $("scans");
    const keep = new Set(rows.map((s) => "scan-" + s.id));
    for (const tr of [...body.children]) if (!keep.has(tr.id)) tr.remove();
    for (const scan of rows.slice().reverse()) renderRow(scan);
    // Newest first, whatever order the rows were added in.
    for (const scan of rows) body.append($("scan-" + scan.id));
    if (!rows.length) body.append(el("tr", {id: "scan-none"},
      el("td", {colspan: 10, className: "muted", text: "No scans match."})));
    const first = rows.length ? state.offset + 1 : 0;
    $("page-info").textContent = rows.length ?
      `scans ${first}–${state.offset + page.scans.length}` : "";
    $("prev").disabled = state.offset === 0;
    $("next").disabled = page.next_offset === null || page.next_offset === undefined;
    const f = state.filters;
    $("scans-caption").textContent = "Newest first" +
      (f.status || f.key || f.text ? " · filtered by " + [f.status && "status " + f.status,
        f.key && "key " + f.key, f.text && "text “" + f.text + "”"].filter(Boolean).join(", ") : "");
    if (state.view === "scans") setError("");
  } catch (e) { if (e.status !== 401) setError(e.message); }
}

async function refreshRow(id) {
  try {
    const scan = await api("/scans/" + encodeURIComponent(id));
    if (state.offset === 0 && matchesFilters(scan)) {
      state.scans.set(id, scan);
      renderRow(scan);
      const none = $("scan-none"); if (none) none.remove();
    }
  } catch (e) { /* gone or hidden: the next poll settles it */ }
}

function renderRow(scan) {
  let tr = document.getElementById("scan-" + scan.id);
  if (!tr) {
    tr = el("tr", {id: "scan-" + scan.id});
    $("scans").prepend(tr);
  }
  const idCell = el("td", {className: "id mono", title: scan.id}, scanLink(scan.id, true));
  const actions = el("td", {className: "actions"});
  if (ACTIVE.has(scan.status)) {
    actions.append(el("button", {type: "button", className: "small danger",
      "aria-label": "Cancel scan " + scan.id, text: "Cancel", onclick: () => cancelScan(scan.id)}));
  } else {
    actions.append(el("button", {type: "button", className: "small secondary",
      "aria-label": "Retry scan " + scan.id, text: "Retry", onclick: () => retryScan(scan)}));
  }
  tr.replaceChildren(
    idCell,
    el("td", {className: "status st-" + scan.status, text: scan.status}),
    el("td", {className: "key mono", text: scan.key || ""}),
    el("td", {className: "wide", text: (scan.providers_scanned || []).join(", ")}),
    el("td", {className: "wide", text: (scan.frameworks_scanned || []).join(", ")}),
    el("td", {className: "findings num", text: scan.findings_count}),
    el("td", {className: "attempts num wide", text: scan.attempts}),
    el("td", {className: "wide", text: when(scan.created_at)}),
    el("td", {className: "err wide", text: scan.error || ""}),
    actions,
  );
  tr.dataset.status = scan.status;
}

async function loadActivity() {
  try {
    const a = await api("/activity?minutes=60");
    renderCounts(a.counts);
    drawCharts(a.minutes);
  } catch (e) {
    if (e.status === 401) return;
    $("counts").replaceChildren(unavailable("Counts per status", e));
  }
}

function renderCounts(counts) {
  const box = $("counts");
  const buttons = [["", "all", Object.values(counts).reduce((a, b) => a + b, 0)],
                   ...STATUSES.map((s) => [s, s, counts[s] || 0])];
  if (counts.unknown) buttons.push(["unknown", "unknown status", counts.unknown]);
  box.replaceChildren(...buttons.map(([value, label, n]) => el("button", {
    type: "button", "aria-pressed": String(state.filters.status === value),
    dataset: {status: value || "all"}, disabled: value === "unknown",
    onclick: () => { $("f-status").value = value; applyFilters(); }},
    el("span", {className: "n", text: n}), el("span", {className: "label", text: label}))));
}

function applyFilters() {
  const q = new URLSearchParams();
  const status = $("f-status").value, key = $("f-key").value.trim(), text = $("f-text").value.trim();
  if (status) q.set("status", status);
  if (key) q.set("key", key);
  if (text) q.set("q", text);
  const qs = q.toString();
  history.pushState(null, "", "/" + (qs ? "?" + qs : ""));
  route();
}

$("filters").addEventListener("submit", (e) => { e.preventDefault(); applyFilters(); });
$("f-clear").addEventListener("click", () => {
  $("f-status").value = ""; $("f-key").value = ""; $("f-text").value = ""; applyFilters();
});
$("f-status").addEventListener("change", applyFilters);
$("prev").addEventListener("click", () => pageTo(Math.max(0, state.offset - PAGE_SIZE)));
$("next").addEventListener("click", () => { if (state.nextOffset != null) pageTo(state.nextOffset); });

function pageTo(offset) {
  const q = new URLSearchParams(location.search);
  if (offset) q.set("offset", String(offset)); else q.delete("offset");
  const qs = q.toString();
  history.pushState(null, "", "/" + (qs ? "?" + qs : ""));
  route();
}

$("enqueue").addEventListener("submit", async (e) => {
  e.preventDefault();
  const body = {providers: list($("providers").value), frameworks: list($("frameworks").value)};
  if ($("key").value.trim()) body.key = $("key").value.trim();
  if ($("user").value.trim()) body.user = $("user").value.trim();
  try {
    const scan = await api("/scans", {method: "POST", json: body});
    if (matchesFilters(scan) && state.offset === 0) { state.scans.set(scan.id, scan); renderRow(scan); }
    $("providers").value = "";
    setError("");
    setNotice("Enqueued scan " + scan.id + ".");
  } catch (err) { setError(err.message); }
});

// -- actions ------------------------------------------------------------------------------------

async function cancelScan(id) {
  try {
    const scan = await api("/scans/" + encodeURIComponent(id) + "/cancel", {method: "POST"});
    if (state.scans.has(id)) { state.scans.set(id, scan); renderRow(scan); }
    if (state.view === "scan" && state.scanId === id) loadScan(false);
    setNotice("Canceled scan " + id + ".");
    return true;
  } catch (e) { setError(e.message); return false; }
}

function retryBody(scan) {
  // A new scan with the same providers, frameworks and key (CONTRACT §10).
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

async function retryScan(scan, quiet) {
  try {
    const copy = await api("/scans", {method: "POST", json: retryBody(scan)});
    if (!quiet) {
      setNotice("Retrying as scan " + copy.id + ".");
      if (state.view === "scans" && state.offset === 0 && matchesFilters(copy)) {
        state.scans.set(copy.id, copy); renderRow(copy);
      }
    }
    return copy;
  } catch (e) { setError("retry of " + scan.id + " failed: " + e.message); return null; }
}

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

async function matchingScans(wanted) {
  // Every scan the current filters match (at most BULK_MAX), whose status is wanted.
  const found = [];
  let offset = 0;
  for (let round = 0; round < BULK_MAX / 200 + 1 && found.length < BULK_MAX; round++) {
    const page = await api("/scans?" + filterQuery(offset, 200).toString());
    for (const s of page.scans) if (matchesFilters(s) && wanted(s)) found.push(s);
    if (page.next_offset === null || page.next_offset === undefined) return {found, more: false};
    offset = page.next_offset;
  }
  return {found: found.slice(0, BULK_MAX), more: true};
}

function describeFilters() {
  const f = state.filters;
  const parts = [f.status && "status " + f.status, f.key && "key " + f.key, f.text && "text “" + f.text + "”"];
  return parts.filter(Boolean).join(", ") || "no filter";
}

async function bulk(kind) {
  setError("");
  const cancel = kind === "cancel";
  let result;
  try {
    result = await matchingScans(cancel ? (s) => ACTIVE.has(s.status) : (s) => !ACTIVE.has(s.status));
  } catch (e) { setError(e.message); return; }
  const n = result.found.length;
  if (!n) { setNotice(cancel ? "No queued or running scans match." : "No finished scans match."); return; }
  const what = cancel ? `Cancel ${n} queued or running scan${n === 1 ? "" : "s"}` :
                        `Retry ${n} finished scan${n === 1 ? "" : "s"} (each as a new scan)`;
  const text = `${what} matching ${describeFilters()}?` + (result.more ? ` Only the first ${BULK_MAX} are included.` : "");
  if (!(await confirmDialog(text, cancel ? `Cancel ${n}` : `Retry ${n}`))) return;
  let ok = 0, failed = 0;
  for (const scan of result.found) {
    const done = cancel ? await cancelScan(scan.id) : await retryScan(scan, true);
    if (done) ok++; else failed++;
    $("page-info").textContent = `${cancel ? "canceling" : "retrying"}: ${ok + failed} of ${n}`;
  }
  setNotice(`${cancel ? "Canceled" : "Retried"} ${ok} of ${n} scans` + (failed ? ` (${failed} had already moved on)` : "") + ".");
  loadScans(); loadActivity();
}

$("bulk-cancel").addEventListener("click", () => bulk("cancel"));
$("bulk-retry").addEventListener("click", () => bulk("retry"));

// -- the chart (inline SVG) --------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  for (const c of children) node.append(c);
  return node;
}

function drawCharts(minutes) {
  const W = 600, H = 140, L = 34, B = 18, n = minutes.length || 1;
  const bw = (W - L) / n;
  const finished = minutes.map((m) => m.completed + m.failed + m.canceled);
  const top = Math.max(1, ...finished);
  const barsBox = $("chart-finished");
  const bars = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": "Scans finished per minute over the last hour"});
  axes(bars, W, H, L, B, top, minutes);
  minutes.forEach((m, i) => {
    let y = H - B;
    for (const [k, color] of [["completed", "#2e8b57"], ["failed", "#c0392b"], ["canceled", "#9aa6b2"]]) {
      if (!m[k]) continue;
      const h = (m[k] / top) * (H - B - 8);
      y -= h;
      bars.append(svg("rect", {x: L + i * bw + 0.5, y, width: Math.max(1, bw - 1), height: h, fill: color},
        svg("title", {}, `${when(m.at).slice(11, 16)} ${k}: ${m[k]}`)));
    }
  });
  barsBox.querySelector(".svg").replaceChildren(bars);
  const sum = (k) => minutes.reduce((a, m) => a + m[k], 0);
  barsBox.querySelector(".summary").textContent =
    `Last hour: ${sum("completed")} completed, ${sum("failed")} failed, ${sum("canceled")} canceled.`;

  const latBox = $("chart-latency");
  const maxLat = Math.max(0.001, ...minutes.map((m) => m.pickup_max_s || 0));
  const line = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": "Pickup latency per minute over the last hour"});
  axes(line, W, H, L, B, maxLat, minutes, "s");
  for (const [k, color] of [["pickup_max_s", "#e0a030"], ["pickup_mean_s", "#2f5f94"]]) {
    const pts = [];
    minutes.forEach((m, i) => {
      if (m[k] === null || m[k] === undefined) return;
      pts.push(`${(L + i * bw + bw / 2).toFixed(1)},${(H - B - (m[k] / maxLat) * (H - B - 8)).toFixed(1)}`);
    });
    if (pts.length === 1) {
      const [x, y] = pts[0].split(",");
      line.append(svg("circle", {cx: x, cy: y, r: 3, fill: color}));
    } else if (pts.length) {
      line.append(svg("polyline", {points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 2}));
    }
  }
  latBox.querySelector(".svg").replaceChildren(line);
  const started = sum("started");
  const mean = started ? minutes.reduce((a, m) => a + (m.pickup_mean_s || 0) * m.started, 0) / started : null;
  latBox.querySelector(".summary").textContent = started ?
    `Last hour: ${started} started, mean pickup ${mean.toFixed(2)} s, worst ${maxLat.toFixed(2)} s.` :
    "No scan started in the last hour.";
}

function axes(root, W, H, L, B, top, minutes, unit) {
  root.append(svg("line", {x1: L, y1: H - B, x2: W, y2: H - B, stroke: "#9aa6b2"}));
  root.append(svg("text", {x: L - 4, y: 12, "text-anchor": "end", "font-size": 10, fill: "#5c6670"},
    unit ? top.toFixed(top < 10 ? 1 : 0) + unit : String(top)));
  root.append(svg("text", {x: L - 4, y: H - B, "text-anchor": "end", "font-size": 10, fill: "#5c6670"}, "0"));
  if (minutes.length) {
    root.append(svg("text", {x: L, y: H - 4, "font-size": 10, fill: "#5c6670"}, when(minutes[0].at).slice(11, 16)));
    root.append(svg("text", {x: W, y: H - 4, "text-anchor": "end", "font-size": 10, fill: "#5c6670"}, "now"));
  }
}

// -- one scan ------------------------------------------------------------------------------------

async function loadScan(withFindings) {
  const id = state.scanId;
  let scan;
  try { scan = await api("/scans/" + encodeURIComponent(id)); }
  catch (e) {
    if (e.status === 404) {
      $("scan-facts").replaceChildren(el("p", {className: "unavailable", text: "No scan with id " + id + "."}));
      $("scan-actions").replaceChildren();
    } else if (e.status !== 401) setError(e.message);
    return;
  }
  if (state.scanId !== id) return;
  state.scan = scan;
  renderFacts(scan);
  loadTimeline(id);
  if (withFindings || scan.status !== "running") loadFindings(id, true);
}

function renderFacts(scan, worker) {
  const facts = $("scan-facts");
  const pairs = [
    ["status", el("span", {className: "status st-" + scan.status, id: "scan-status", text: scan.status})],
    ["key", el("code", {text: scan.key || "—"})],
    ["providers", (scan.providers_scanned || []).join(", ")],
    ["frameworks", (scan.frameworks_scanned || []).join(", ") || "—"],
    ["user", scan.triggered_by_user || "—"],
    ["priority", scan.priority ?? 0],
    ["created", when(scan.created_at)],
    ["started", when(scan.started_at) || "—"],
    ["finished", when(scan.finished_at) || "—"],
    ["attempts", el("span", {id: "scan-attempts", text: scan.attempts})],
    ["retries", scan.retries ?? 0],
    ["findings", `${scan.findings_count}` +
      (scan.findings_new != null ? ` (${scan.findings_new} new, ${scan.findings_fixed} fixed)` : "")],
    ["error", el("span", {id: "scan-error", className: scan.error ? "st-failed" : "", text: scan.error || "—"})],
  ];
  if (scan.labels && Object.keys(scan.labels).length) {
    pairs.push(["labels", Object.entries(scan.labels).map(([k, v]) => k + "=" + v).join(", ")]);
  }
  if (scan.baseline_id) pairs.push(["baseline", scanLink(scan.baseline_id, true)]);
  const w = worker || state.worker;
  pairs.push(["worker", el("span", {id: "scan-worker", text: w ?
    [w.hostname || w.id, w.pid ? "pid " + w.pid : null, w.heartbeat_at ? "heartbeat " + ago(w.heartbeat_at) : null]
      .filter(Boolean).join(" · ") : "—"})]);
  facts.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {text: k}), el("dd", {}, v)]));
  const actions = $("scan-actions");
  actions.replaceChildren();
  if (ACTIVE.has(scan.status)) {
    actions.append(el("button", {type: "button", className: "danger", id: "scan-cancel", text: "Cancel",
      onclick: () => cancelScan(scan.id)}));
  }
  actions.append(el("button", {type: "button", className: "secondary", id: "scan-retry",
    text: "Retry (enqueue a copy)", onclick: async () => {
      const copy = await retryScan(scan, true);
      if (copy) navigate("/scans/" + encodeURIComponent(copy.id));
    }}));
}

async function loadTimeline(id) {
  try {
    const t = await api("/scans/" + encodeURIComponent(id) + "/events");
    if (state.scanId !== id) return;
    state.worker = t.worker;
    if (state.scan) renderFacts(state.scan, t.worker);
    for (const e of t.events) addTimeline(e);
    $("timeline-note").textContent = t.events.length ? "" :
      "No retained events for this scan (the event log keeps the most recent ones).";
  } catch (e) {
    if (e.status === 401) return;
    $("timeline-note").replaceChildren(unavailable("The event timeline", e));
  }
}

function addTimeline(event) {
  if (!event.id || state.timelineIds.has(event.id)) return;
  state.timelineIds.add(event.id);
  const extra = Object.assign({}, event);
  for (const k of ["id", "type", "scan_id", "at"]) delete extra[k];
  const detail = Object.entries(extra).map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v)).join("  ");
  const li = el("li", {className: "t-" + event.type.replace(/\./g, "-"), dataset: {type: event.type, id: event.id}},
    el("span", {className: "when", text: when(event.at).slice(11) + " "}),
    el("strong", {text: event.type}),
    detail ? el("div", {className: "detail", text: detail}) : null);
  // Keep the list in id order even when a live event arrives before the page's read.
  const ol = $("timeline");
  const after = [...ol.children].find((n) => compareIds(n.dataset.id, event.id) > 0);
  ol.insertBefore(li, after || null);
  $("timeline-note").textContent = "";
}

function compareIds(a, b) {
  const pa = String(a).split("-").map(Number), pb = String(b).split("-").map(Number);
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const d = (pa[i] || 0) - (pb[i] || 0);
    if (d) return d;
  }
  return 0;
}

async function loadFindings(id, reset) {
  if (reset) state.findingsOffset = 0;
  const body = $("findings");
  let diff = null, diffError = null;
  try { diff = await api("/scans/" + encodeURIComponent(id) + "/diff"); }
  catch (e) { diffError = e; }
  let page;
  try {
    page = await api(`/scans/${encodeURIComponent(id)}/findings?limit=100&offset=${state.findingsOffset}`);
  } catch (e) {
    if (e.status === 401) return;
    if (state.scanId !== id) return;
    body.replaceChildren();
    $("diff-summary").replaceChildren(unavailable("Findings", e.status === 404 && state.scan ? e : e));
    return;
  }
  if (state.scanId !== id) return;
  if (reset) body.replaceChildren();
  const summary = $("diff-summary");
  if (diff) {
    summary.replaceChildren(
      el("span", {className: "badge new", text: diff.new.length + " new"}), " ",
      el("span", {className: "badge reopened", text: diff.reopened.length + " reopened"}), " ",
      el("span", {className: "badge fixed", text: diff.fixed.length + " fixed"}), " ",
      el("span", {className: "badge unchanged", text: diff.unchanged + " unchanged"}), " ",
      diff.baseline_id ? el("span", {className: "muted"}, " against ", scanLink(diff.baseline_id, true)) :
        el("span", {className: "muted", text: " (no earlier completed scan of this key: everything is new)"}));
  } else {
    summary.replaceChildren(el("span", {className: "muted", text: diffError && diffError.status === 409 ?
      diffError.message : diffError && diffError.status === 404 ? "Diffs are not available from this server." :
      diffError ? diffError.message : ""}));
  }
  const rows = page.findings.slice();
  // Fixed findings belong to the baseline; show them with this scan's.
  if (reset && diff) for (const f of diff.fixed) rows.push(Object.assign({}, f, {state: "fixed"}));
  for (const f of rows) {
    const st = f.state || "";
    body.append(el("tr", {dataset: {state: st}},
      el("td", {}, st ? el("span", {className: "badge " + st, text: st}) : "—"),
      el("td", {text: f.severity || ""}),
      el("td", {className: "mono", text: f.check_id}),
      el("td", {className: "wide", text: f.provider}),
      el("td", {className: "mono", text: f.resource || ""}),
      el("td", {className: "wide", text: f.message || ""})));
  }
  if (!body.children.length) body.append(el("tr", {}, el("td", {colspan: 6, className: "muted", text: "No findings."})));
  const more = page.next_offset !== null && page.next_offset !== undefined;
  $("findings-more").hidden = !more;
  state.findingsOffset = more ? page.next_offset : state.findingsOffset;
  $("findings-note").textContent = `${page.total} finding${page.total === 1 ? "" : "s"} in this scan`;
}

$("findings-more").addEventListener("click", () => loadFindings(state.scanId, false));

// -- the queue ------------------------------------------------------------------------------------

let queueRefreshPending = null;
function scheduleQueueRefresh() {
  if (queueRefreshPending) return;
  queueRefreshPending = setTimeout(() => { queueRefreshPending = null; loadQueue(); }, 500);
}

async function loadQueue() {
  const box = $("queue-body");
  let q;
  try { q = await api("/queue"); }
  catch (e) {
    if (e.status === 401) return;
    box.replaceChildren(unavailable("The queue (depth, keys, limits, pauses, workers)", e));
    return;
  }
  if (state.view !== "queue") return;
  const focused = document.activeElement && document.activeElement.id;
  box.replaceChildren(...renderQueue(q));
  if (focused && $(focused)) $(focused).focus();
}

function table(caption, head, rows, id) {
  return el("div", {className: "table-wrap"}, el("table", {id},
    el("caption", {text: caption}),
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {scope: "col", text: h})))),
    el("tbody", {}, ...(rows.length ? rows : [el("tr", {}, el("td", {colspan: head.length, className: "muted", text: "None."}))]))));
}

function limitText(limit, overridden) {
  if (!limit) return "none";
  return String(limit) + (overridden ? "" : " (default)");
}

function renderQueue(q) {
  // GET /api/v1/queue: what `scanqueue queue --json` prints (CONTRACT §7).
  const all = !!q.paused_all;
  const statuses = q.statuses || {};
  const workers = q.workers || [];
  const figures = [["depth (queued)", q.depth], ["running", statuses.running],
    ["oldest queued", q.oldest_queued_age_s ? duration(Math.round(q.oldest_queued_age_s)) : "—"],
    ["live workers", workers.length],
    ["slots", workers.reduce((a, w) => a + (w.slots || 0), 0)],
    ["default limit per key", q.default_limit ? q.default_limit : "none"]];
  const summary = el("div", {className: "counts", id: "queue-figures"},
    ...figures.map(([label, n]) => el("div", {className: "card", dataset: {figure: label}},
      el("div", {className: "n", text: n ?? 0}), el("div", {className: "label muted", text: label}))));
  const whole = el("div", {className: "card"},
    el("p", {className: "flush"}, "Whole queue: ", el("span", {className: "badge " + (all ? "paused" : "active"),
      id: "queue-state", text: all ? "paused" : "running"}),
      all ? " — queued scans wait; running ones go on." : ""),
    el("button", {type: "button", id: all ? "resume-all" : "pause-all", className: all ? "" : "danger",
      text: all ? "Resume the whole queue" : "Pause the whole queue", onclick: () => setPaused(null, !all)}));

  const keyRows = (q.keys || []).map((k) => el("tr", {dataset: {key: k.key}},
    el("td", {className: "mono", text: k.key}),
    el("td", {className: "num", text: k.running ?? 0}),
    el("td", {className: "num wide", text: k.in_flight ?? 0}),
    el("td", {className: "num", text: limitText(k.limit, k.limit_overridden)}),
    el("td", {}, el("span", {className: "badge " + (k.paused ? "paused" : "active"), text: k.paused ? "paused" : "active"})),
    el("td", {}, el("button", {type: "button", className: "small " + (k.paused ? "" : "secondary"),
      "aria-label": (k.paused ? "Resume key " : "Pause key ") + k.key, text: k.paused ? "Resume" : "Pause",
      onclick: () => setPaused(k.key, !k.paused)}))));
  const pauseForm = el("form", {className: "inline", id: "pause-form"},
    el("label", {}, "Key to pause ", el("input", {id: "pause-key", placeholder: "aws|soc2", required: true})),
    el("button", {type: "submit", text: "Pause key"}));
  pauseForm.addEventListener("submit", (e) => { e.preventDefault(); setPaused($("pause-key").value.trim(), true); });

  const workerRows = workers.map((w) => el("tr", {dataset: {worker: w.id}},
    el("td", {className: "mono", text: w.hostname || w.id}),
    el("td", {className: "num", text: w.pid ?? ""}),
    el("td", {className: "num", text: w.slots ?? ""}),
    el("td", {text: ago(w.heartbeat_at)}),
    el("td", {className: "wide", text: ago(w.started_at)})));
  return [summary, whole,
    table("Keys: running against their limits, and pauses", ["key", "running", "dispatched", "limit", "state", ""], keyRows, "keys-table"),
    el("div", {className: "card"}, pauseForm),
    table("Live workers", ["worker", "pid", "slots", "heartbeat", "up since"], workerRows, "workers-table")];
}

async function setPaused(key, pause) {
  const verb = pause ? "pause" : "resume";
  try {
    await api("/queue/" + verb, {method: "POST", json: key ? {key} : {}});
    setNotice((pause ? "Paused " : "Resumed ") + (key ? "key " + key : "the whole queue") + ".");
    loadQueue();
  } catch (e) {
    setError(e.status === 404 && !e.message.startsWith("no ") ?
      "Pausing is not available from this server (its API answered 404)." : e.message);
  }
}

// -- schedules ------------------------------------------------------------------------------------

async function loadSchedules() {
  const box = $("schedules-body");
  let answer;
  try { answer = await api("/schedules"); }
  catch (e) {
    if (e.status === 401) return;
    box.replaceChildren(unavailable("Schedules", e));
    return;
  }
  if (state.view !== "schedules") return;
  const rows = (Array.isArray(answer) ? answer : answer.schedules || []).map((s) => el("tr", {id: "schedule-" + s.name, dataset: {name: s.name, paused: String(!!s.paused)}},
    el("td", {className: "mono", text: s.name}),
    el("td", {text: (s.cron ? "cron " + s.cron : "every " + duration(s.every_seconds)) + (s.tz && s.tz !== "UTC" ? " (" + s.tz + ")" : "")}),
    el("td", {className: "wide", text: (s.providers || []).join(", ") + (s.frameworks && s.frameworks.length ? " | " + s.frameworks.join(", ") : "")}),
    el("td", {className: "next", text: s.paused ? "— (paused)" : when(s.next_run_at) + (s.next_run_at ? " (" + ago(s.next_run_at) + ")" : "")}),
    el("td", {}, s.last_scan_id ? scanLink(s.last_scan_id, true) : "—", s.last_fired_at ? " " + ago(s.last_fired_at) : ""),
    el("td", {}, el("span", {className: "badge " + (s.paused ? "paused" : "active"), text: s.paused ? "paused" : "active"})),
    el("td", {},
      el("button", {type: "button", className: "small secondary", "aria-label": (s.paused ? "Resume " : "Pause ") + s.name,
        text: s.paused ? "Resume" : "Pause", onclick: () => scheduleAction(s.name, s.paused ? "resume" : "pause")}), " ",
      el("button", {type: "button", className: "small", "aria-label": "Run " + s.name + " now",
        text: "Run now", onclick: () => scheduleAction(s.name, "run")}))));
  const focused = document.activeElement && document.activeElement.getAttribute("aria-label");
  box.replaceChildren(table("Recurring scans, fired by the leader bridge",
    ["name", "when", "providers | frameworks", "next run (UTC)", "last scan", "state", "actions"], rows, "schedules-table"));
  if (focused) { const b = box.querySelector(`button[aria-label="${CSS.escape(focused)}"]`); if (b) b.focus(); }
}

async function scheduleAction(name, verb) {
  try {
    const answer = await api(`/schedules/${encodeURIComponent(name)}/${verb}`, {method: "POST"});
    if (verb === "run") {
      setNotice(`Schedule ${name} ran now: scan ${answer.id}.`);
    } else {
      setNotice(`Schedule ${name} ${verb === "pause" ? "paused" : "resumed"}.`);
    }
    loadSchedules();
  } catch (e) { setError(e.message); }
}

// -- start ------------------------------------------------------------------------------------------

async function primeCursor() {
  // Subscribe from where the stream stands now, so that even a first connection that
  // drops before any event arrives resumes without a gap (a 401 asks for the token).
  try {
    const a = await api("/activity?minutes=1");
    if (!state.lastEventId && a.last_event_id) state.lastEventId = a.last_event_id;
  } catch (e) { /* askForToken on a 401; otherwise the stream starts from now */ }
}

async function start() {
  if (state.token) {
    $("signout").hidden = false;
    try { await openSession(); startRenewing(); } catch (e) { /* askForToken was called on a 401 */ }
  }
  await primeCursor();
  route();
  if (!state.needsToken) connect();
}

start();
