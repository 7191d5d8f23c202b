// Schedules ("/schedules"): next run, last scan, pause/resume and run-now.
import {
  $, ago, api, duration, el, scanLink, setError, setNotice, state, table, unavailable, when,
} from "./core.js";


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


export const schedulesView = {
  load: loadSchedules,
  poll: loadSchedules,
  pollEvery: 8000,
  onEvent(event) {
    if (state.view === "schedules" && event.type.startsWith("schedule.")) loadSchedules();
  },
};
