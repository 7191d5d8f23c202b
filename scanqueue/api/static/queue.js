// The queue ("/queue"): depth, the whole queue's pause, keys running against their
// limits with per-key pause/resume, and the live workers (GET /api/v1/queue).
import {$, STATUS_OF, ago, api, duration, el, setError, setNotice, state, table, unavailable} from "./core.js";


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

function limitText(limit, overridden) {
  if (!limit) return "none";
  return String(limit) + (overridden ? "" : " (default)");
}

function renderQueue(q) {
  // GET /api/v1/queue: what `scanqueue queue --json` prints (docs/reference.md#policies).
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


export const queueView = {
  load: loadQueue,
  poll: loadQueue,
  pollEvery: 3000,
  onEvent(event) { if (state.view === "queue" && STATUS_OF[event.type]) scheduleQueueRefresh(); },
};
