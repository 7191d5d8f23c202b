// scanqueue console (docs/reference.md#console): the entry point. It asks for the token when the
// server wants one, routes between the views by address (no reload), and follows the
// scans live through the event stream (stream.js: fetch() with the Authorization
// header, never the token in a URL), resuming after a dropped connection and showing
// it when the stream is down.
import {
  $, TOKEN_KEY, api, askForToken, navigate, primeCursor, setConn, setError, setRouter, state,
} from "./core.js";
import {queueView} from "./queue.js";
import {scanView} from "./scan.js";
import {scansView} from "./scans.js";
import {schedulesView} from "./schedules.js";
import {openStream} from "./stream.js";

const VIEWS = {scans: scansView, scan: scanView, queue: queueView, schedules: schedulesView};

// -- the token ------------------------------------------------------------------------------------

$("auth").addEventListener("submit", async (e) => {
  e.preventDefault();
  const given = $("token").value.trim();
  if (!given) return;
  state.token = given;
  try {
    // Any read proves the token; this one also says where the stream stands now.
    const a = await api("/activity?minutes=1");
    if (!state.lastEventId && a.last_event_id) state.lastEventId = a.last_event_id;
  } catch (err) {
    if (err.status === 401) {
      state.token = "";
      $("auth-error").textContent = "That token was refused.";
      return;
    }
    // Anything else (an older server without /activity): the token was not refused.
  }
  sessionStorage.setItem(TOKEN_KEY, given);
  $("token").value = "";
  $("auth").style.display = "none";
  $("signout").hidden = false;
  state.needsToken = false;
  connect();
  route();
});

$("signout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = "";
  $("signout").hidden = true;
  if (state.stream) state.stream.close();
  state.stream = null;
  askForToken("");
});


function connect() {
  if (state.stream) state.stream.close();
  state.stream = openStream({
    onOpen: () => {
      setConn("ok", "live");
      refreshView();          // whatever happened while disconnected
    },
    onDown: () => setConn("down", "disconnected, retrying…"),
    onRefused: () => {
      state.stream = null;
      askForToken(state.token ? "That token was refused." : "");
    },
    onEvent: (message) => {
      if (message.type !== "message") return;
      let event;
      try { event = JSON.parse(message.data); } catch (e) { return; }
      for (const view of Object.values(VIEWS)) view.onEvent(event);
    },
  });
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
  if (state.token) $("signout").hidden = false;
  await primeCursor();        // a 401 here asks for the token
  route();
  if (!state.needsToken) connect();
}

start();
