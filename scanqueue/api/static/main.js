// scanqueue console (CONTRACT §10): the entry point. It asks for the token when the
// server wants one, routes between the views by address (no reload), and follows the
// scans live through an EventSource on /api/v1/events, resuming after a dropped
// connection and showing it when the stream is down.
import {
  $, API, TOKEN_KEY, askForToken, api, navigate, openSession, primeCursor, setConn, setError,
  setRouter, startRenewing, state,
} from "./core.js";
import {queueView} from "./queue.js";
import {scanView} from "./scan.js";
import {scansView} from "./scans.js";
import {schedulesView} from "./schedules.js";

const VIEWS = {scans: scansView, scan: scanView, queue: queueView, schedules: schedulesView};

// -- the token ------------------------------------------------------------------------------------

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
    for (const view of Object.values(VIEWS)) view.onEvent(event);
  };
}



// -- routing ------------------------------------------------------------------------------------

function viewOf(path) {
  const m = path.match(/^\/scans\/([^/]+)$/);
  if (m) return ["scan", decodeURIComponent(m[1])];
  if (path === "/queue" || path === "/schedules") return [path.slice(1), null];
  return ["scans", null];
}

function route() {
  [state.view, state.scanId] = viewOf(location.pathname);
  for (const v of Object.keys(VIEWS)) $("view-" + v).hidden = v !== state.view;
  for (const a of document.querySelectorAll("nav a[data-view]")) {
    const current = a.dataset.view === state.view || (state.view === "scan" && a.dataset.view === "scans");
    if (current) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  setError("");
  document.title = (state.view === "scans" ? "" : state.view + " · ") + "scanqueue";
  const view = VIEWS[state.view];
  if (view.enter) view.enter();
  refreshView();
}

function refreshView() {
  if (state.needsToken) return;
  const view = VIEWS[state.view];
  view.load();
  clearInterval(state.pollTimer);
  // The stream says what changes; a slow poll catches rows other programs insert and
  // keeps heartbeats and the chart current.
  if (!view.poll) return;
  state.pollTimer = setInterval(() => {
    if (!state.needsToken && !document.hidden) view.poll();
  }, view.pollEvery);
}

document.addEventListener("click", (e) => {
  const a = e.target.closest && e.target.closest("a[data-nav]");
  if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey) return;
  e.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", route);
setRouter(route);

// -- start ------------------------------------------------------------------------------------------

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
