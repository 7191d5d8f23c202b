// A scan's page ("/scans/{id}"): its fields and worker, the timeline from the durable
// event log, findings with their diff badges, cancel and retry.
import {
  $, ACTIVE, STATUS_OF, api, cancelScan, el, navigate, retryScan, scanLink, setError, state,
  unavailable, when, ago,
} from "./core.js";


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
  // undefined: the page's read of the events (which names the worker) is not in yet.
  pairs.push(["worker", el("span", {id: "scan-worker", text: w ?
    [w.hostname || w.id, w.pid ? "pid " + w.pid : null, w.heartbeat_at ? "heartbeat " + ago(w.heartbeat_at) : null]
      .filter(Boolean).join(" · ") : state.worker === undefined ? "…" : "—"})]);
  facts.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {text: k}), el("dd", {}, v)]));
  const actions = $("scan-actions");
  actions.replaceChildren();
  if (ACTIVE.has(scan.status)) {
    actions.append(el("button", {type: "button", className: "danger", id: "scan-cancel", text: "Cancel",
      onclick: async () => { if (await cancelScan(scan.id)) loadScan(false); }}));
  }
  actions.append(el("button", {type: "button", className: "secondary", id: "scan-retry",
    text: "Retry (enqueue a copy)", onclick: async () => {
      const copy = await retryScan(scan);
      if (copy) navigate("/scans/" + encodeURIComponent(copy.id));
    }}));
}

async function loadTimeline(id) {
  try {
    const t = await api("/scans/" + encodeURIComponent(id) + "/events");
    if (state.scanId !== id) return;
    state.worker = t.worker || null;
    if (state.scan) renderFacts(state.scan, t.worker);
    for (const e of t.events) addTimeline(e);
    $("timeline-note").textContent = t.events.length ? "" :
      "No retained events for this scan (the event log keeps the most recent ones).";
  } catch (e) {
    if (e.status === 401) return;
    if (state.scanId === id && state.worker === undefined) {
      state.worker = null;  // not known: shown as none rather than as still loading
      if (state.scan) renderFacts(state.scan);
    }
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


function enter() {
  state.scan = null;
  state.worker = undefined;
  state.timelineIds = new Set();
  $("timeline").replaceChildren();
  $("findings").replaceChildren();
  $("diff-summary").replaceChildren();
  $("scan-title").textContent = "Scan " + state.scanId;
  document.title = "scan " + state.scanId.slice(0, 12) + " · scanqueue";
}

function onEvent(event) {
  if (state.view !== "scan" || event.scan_id !== state.scanId) return;
  addTimeline(event);
  if (STATUS_OF[event.type] || event.type === "scan.finding") loadScan(false);
}

export const scanView = {
  enter,
  load() { loadScan(true); },
  poll: null,
  onEvent,
};
