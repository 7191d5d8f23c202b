// The scans view's two charts, drawn as inline SVG from GET /api/v1/activity: scans
// finished per minute (stacked by outcome) and pickup latency per minute (mean, max).
import {$, when} from "./core.js";


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


export {drawCharts};
