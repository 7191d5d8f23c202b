// The scans view ("/"): counts per status, filters in the address, paging, the
// charts, row actions, confirmed bulk actions, the enqueue form and the raw event log.
import {
  $, ACTIVE, BULK_MAX, PAGE_SIZE, STATUSES, STATUS_OF, api, cancelScan, confirmDialog, el, go,
  list, retryScan, scanLink, setError, setNotice, state, unavailable, when,
} from "./core.js";
import {drawCharts} from "./chart.js";


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
    // Newest first, moving only rows out of place: a moved row would lose the keyboard
    // focus of a button in it.
    let at = body.firstElementChild;
    for (const scan of rows) {
      const tr = $("scan-" + scan.id);
      if (tr === at) at = at.nextElementSibling; else body.insertBefore(tr, at);
    }
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
  // Unchanged rows stay as they are (polls must not take the focus from a button).
  const sig = JSON.stringify([scan.status, scan.findings_count, scan.attempts, scan.error, scan.key]);
  if (tr.dataset.sig === sig) return;
  tr.dataset.sig = sig;
  const idCell = el("td", {className: "id mono", title: scan.id}, scanLink(scan.id, true));
  const actions = el("td", {className: "actions"});
  if (ACTIVE.has(scan.status)) {
    actions.append(el("button", {type: "button", className: "small danger",
      "aria-label": "Cancel scan " + scan.id, text: "Cancel", onclick: () => cancelRow(scan.id)}));
  } else {
    actions.append(el("button", {type: "button", className: "small secondary",
      "aria-label": "Retry scan " + scan.id, text: "Retry", onclick: () => retryRow(scan)}));
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
  go("/" + (qs ? "?" + qs : ""));
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
  go("/" + (qs ? "?" + qs : ""));
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


// -- actions on rows ----------------------------------------------------------------------------

async function cancelRow(id) {
  const scan = await cancelScan(id);
  if (scan && state.scans.has(id)) { state.scans.set(id, scan); renderRow(scan); }
  return scan;
}

async function retryRow(scan) {
  const copy = await retryScan(scan);
  if (copy) {
    setNotice("Retrying as scan " + copy.id + ".");
    if (state.view === "scans" && state.offset === 0 && matchesFilters(copy)) {
      state.scans.set(copy.id, copy); renderRow(copy);
    }
  }
  return copy;
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
    const done = cancel ? await cancelRow(scan.id) : await retryScan(scan);
    if (done) ok++; else failed++;
    $("page-info").textContent = `${cancel ? "canceling" : "retrying"}: ${ok + failed} of ${n}`;
  }
  setNotice(`${cancel ? "Canceled" : "Retried"} ${ok} of ${n} scans` + (failed ? ` (${failed} had already moved on)` : "") + ".");
  loadScans(); loadActivity();
}

$("bulk-cancel").addEventListener("click", () => bulk("cancel"));
$("bulk-retry").addEventListener("click", () => bulk("retry"));


// -- live ------------------------------------------------------------------------------------------

function onEvent(event) {
  // Rows on the list follow their scans' events; a scan not on it is read once.
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
}

function logEvent(event) {
  const log = $("events");
  const extra = Object.assign({}, event);
  for (const k of ["id", "type", "scan_id", "at"]) delete extra[k];
  const line = `${(event.at || "").slice(11, 23)} ${event.type} ${(event.scan_id || "").slice(0, 12)} ` +
    JSON.stringify(extra) + "\n";
  log.textContent = (line + log.textContent).slice(0, 20000);
}

export const scansView = {
  enter: readFilters,
  load() { loadScans(); loadActivity(); },
  poll() { loadScans(); loadActivity(); },
  pollEvery: 8000,
  onEvent,
};
