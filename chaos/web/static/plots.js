// Pictures of the live network: running line plots (canvas), the swarm ring and the link matrix (SVG).
"use strict";

const Plots = (() => {
  const SVG = "http://www.w3.org/2000/svg";

  function el(name, attrs, parent) {
    const e = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  }

  // A running line plot: series = [{label, colour, key}], points = [{t, key: value}], last `spanMs` shown.
  function lines(canvas, points, series, spanMs) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
    const g = canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const left = 48, right = 8, top = 8, bottom = 22;
    const now = points.length ? points[points.length - 1].t : Date.now();
    const t0 = now - spanMs;
    const shown = points.filter(p => p.t >= t0);
    let max = 0;
    for (const p of shown) for (const s of series) { const v = p[s.key]; if (v != null && v > max) max = v; }
    max = niceMax(max || 1);
    g.font = "11px system-ui, sans-serif"; g.fillStyle = "#66727f"; g.strokeStyle = "#e6ebf0"; g.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = top + (h - top - bottom) * i / 4;
      g.beginPath(); g.moveTo(left, y); g.lineTo(w - right, y); g.stroke();
      const v = max * (1 - i / 4);
      g.textAlign = "right"; g.fillText(v >= 10000 ? `${+(v / 1000).toFixed(1)}k` : v >= 100 ? v.toFixed(0) : String(+v.toFixed(2)), left - 6, y + 4);
    }
    g.textAlign = "center";
    for (let s = 0; s <= spanMs / 1000; s += 60) {
      const x = left + (w - left - right) * (1 - s * 1000 / spanMs);
      g.fillText(s === 0 ? "now" : `-${s / 60} min`, x, h - 6);
    }
    const X = t => left + (w - left - right) * (t - t0) / spanMs;
    const Y = v => top + (h - top - bottom) * (1 - v / max);
    for (const s of series) {
      g.strokeStyle = s.colour; g.lineWidth = 1.8; g.beginPath();
      let pen = false;
      for (const p of shown) {
        const v = p[s.key];
        if (v == null) { pen = false; continue; }
        if (!pen) { g.moveTo(X(p.t), Y(v)); pen = true; } else g.lineTo(X(p.t), Y(v));
      }
      g.stroke();
    }
    if (!shown.length) { g.fillStyle = "#9aa5b1"; g.textAlign = "center"; g.fillText("waiting for data…", w / 2, h / 2); }
  }

  function niceMax(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function legend(div, series, points) {
    const last = points.length ? points[points.length - 1] : {};
    div.innerHTML = "";
    for (const s of series) {
      const span = document.createElement("span");
      const v = last[s.key];
      span.innerHTML = `<i style="background:${s.colour}"></i>`;
      span.appendChild(document.createTextNode(`${s.label}: ${v == null ? "–" : (+v).toFixed(v >= 100 ? 0 : 1)}`));
      div.appendChild(span);
    }
  }

  // Swarm colours: dark tones apart from the node states' colours, by the swarm's order on the ring.
  const PALETTE = ["#0f766e", "#8b5a2b", "#334155", "#a21caf", "#65730f", "#1e3a8a", "#9a3412", "#0369a1"];
  let swarmIndex = {};
  function setSwarms(swarms) { swarmIndex = Object.fromEntries(swarms.map((s, i) => [s.id, i])); }
  function swarmColour(id) { return id in swarmIndex ? PALETTE[swarmIndex[id] % PALETTE.length] : "#8a949e"; }

  const STATE = { up: "#2e9d5b", skewed: "#8e44ad", partitioned: "#2f6fd6", paused: "#e08a00", killed: "#d43f3f",
                  down: "#8a949e", starting: "#7fb3d5" };

  // The ring of 2^64 swarm ids: each swarm at its id's angle, its members around it.
  function ring(div, snap) {
    const size = 340, c = size / 2, R = 120;
    const svg = el("svg", { viewBox: `0 0 ${size} ${size}`, width: size, height: size, role: "img",
                            "aria-label": "swarm ring" });
    el("circle", { cx: c, cy: c, r: R, fill: "none", stroke: "#cfd7e0", "stroke-width": 2 }, svg);
    for (let i = 0; i < 4; i++) {
      const a = i * Math.PI / 2 - Math.PI / 2;
      el("line", { x1: c + (R - 5) * Math.cos(a), y1: c + (R - 5) * Math.sin(a), x2: c + (R + 5) * Math.cos(a),
                   y2: c + (R + 5) * Math.sin(a), stroke: "#b0bac5" }, svg);
    }
    const t = el("text", { x: c, y: c - 4, "text-anchor": "middle", "font-size": 12, fill: "#66727f" }, svg);
    t.textContent = `${snap.swarms.length} swarm${snap.swarms.length === 1 ? "" : "s"}`;
    const t2 = el("text", { x: c, y: c + 12, "text-anchor": "middle", "font-size": 11, fill: "#9aa5b1" }, svg);
    t2.textContent = "ids on a ring of 2⁶⁴";
    const byName = Object.fromEntries(snap.nodes.map(n => [n.name, n]));
    for (const s of snap.swarms) {
      const a = s.position * 2 * Math.PI - Math.PI / 2;
      const x = c + R * Math.cos(a), y = c + R * Math.sin(a);
      const col = swarmColour(s.id);
      el("circle", { cx: x, cy: y, r: 7, fill: col, stroke: "#fff", "stroke-width": 2 }, svg);
      const lab = el("text", { x: c + (R - 24) * Math.cos(a), y: c + (R - 24) * Math.sin(a) + 4, "text-anchor": "middle",
                               "font-size": 10, fill: col, "font-family": "monospace" }, svg);
      lab.textContent = s.id.slice(0, 4);
      const k = s.members.length;
      s.members.forEach((m, i) => {
        const b = a + (i - (k - 1) / 2) * 0.16, r2 = R + 26;
        const nx = c + r2 * Math.cos(b), ny = c + r2 * Math.sin(b);
        el("line", { x1: x, y1: y, x2: nx, y2: ny, stroke: col, "stroke-opacity": .35 }, svg);
        const n = byName[m] || {};
        const dot = el("circle", { cx: nx, cy: ny, r: 9, fill: STATE[n.state] || "#999", stroke: "#fff", "stroke-width": 1.5 }, svg);
        el("title", {}, dot).textContent = `${m}: ${n.state}`;
        const lt = el("text", { x: nx, y: ny + 3, "text-anchor": "middle", "font-size": 7.5, fill: "#fff", "font-weight": 700 }, svg);
        lt.textContent = m.replace(/^n0?/, "");
      });
    }
    div.replaceChildren(svg);
  }

  // Which directed node links a fault on the page's list covers.
  function faulted(link, names) {
    const out = new Set();
    const add = (a, b) => { if (a !== b) out.add(a + ">" + b); };
    if (link.all) names.forEach(a => names.forEach(b => add(a, b)));
    else if (link.side_a) {
      link.side_a.forEach(a => link.side_b.forEach(b => { add(a, b); if (!link.one_way) add(b, a); }));
    } else if (link.links) link.links.forEach(([a, b]) => add(a, b));
    else if (link.nodes) link.nodes.forEach(n => names.forEach(o => { add(n, o); add(o, n); }));
    return out;
  }

  // The link matrix: a row per source node, a column per destination, ordered by swarm.
  function matrix(div, snap) {
    const order = [];
    for (const s of snap.swarms) order.push(...s.members);
    for (const n of snap.nodes) if (!order.includes(n.name)) order.push(n.name);
    const N = order.length;
    const cell = Math.max(6, Math.min(30, Math.floor(320 / Math.max(N, 1))));
    const pad = 34, size = pad + N * cell + 4;
    const svg = el("svg", { viewBox: `0 0 ${size} ${size}`, width: size, height: size, role: "img", "aria-label": "link matrix" });
    const byName = Object.fromEntries(snap.nodes.map(n => [n.name, n]));
    const swarmOf = {};
    for (const s of snap.swarms) for (const m of s.members) swarmOf[m] = s;
    const marks = new Map();
    for (const f of snap.link_faults) for (const k of faulted(f, order)) marks.set(k, f);
    order.forEach((a, i) => {
      const sa = swarmOf[a];
      const lab = el("text", { x: pad - 4, y: pad + i * cell + cell * .72, "text-anchor": "end", "font-size": Math.min(10, cell), fill: sa ? swarmColour(sa.id) : "#666" }, svg);
      lab.textContent = a;
      const top = el("text", { x: pad + i * cell + cell / 2, y: pad - 4, "text-anchor": "middle", "font-size": Math.min(9, cell), fill: sa ? swarmColour(sa.id) : "#666" }, svg);
      top.textContent = a.replace(/^n0?/, "");
      order.forEach((b, j) => {
        const x = pad + j * cell, y = pad + i * cell;
        if (a === b) { el("rect", { x, y, width: cell - 1, height: cell - 1, fill: "#eef1f5" }, svg); return; }
        const f = marks.get(a + ">" + b);
        const downA = ["killed", "paused", "down"].includes((byName[a] || {}).state);
        const downB = ["killed", "paused", "down"].includes((byName[b] || {}).state);
        const same = sa && swarmOf[b] === sa;
        let fill = same ? "#dff0e6" : "#f4f7fa";
        if (downA || downB) fill = "#e3e6ea";
        const r = el("rect", { x, y, width: cell - 1, height: cell - 1, fill, rx: 1.5 }, svg);
        if (f) {
          r.setAttribute("fill", f.family === "partition" ? "#2f6fd6" : "#17a2b8");
          const ln = el("line", { x1: x + 2, y1: y + cell - 3, x2: x + cell - 3, y2: y + 2, stroke: "#fff", "stroke-width": 1.5 }, svg);
          el("title", {}, ln);
        }
        el("title", {}, r).textContent = `${a} → ${b}` + (f ? `: fault ${f.fault} ${f.kind}` : same ? " (same swarm)" : "") +
          (downA || downB ? " (an end is down)" : "");
      });
    });
    div.replaceChildren(svg);
    const key = document.createElement("div");
    key.className = "legend";
    key.innerHTML = '<span><i style="background:#dff0e6;height:10px"></i>same swarm</span>' +
      '<span><i style="background:#2f6fd6;height:10px"></i>partitioned</span>' +
      '<span><i style="background:#17a2b8;height:10px"></i>link fault</span>' +
      '<span><i style="background:#e3e6ea;height:10px"></i>an end is down</span>';
    div.appendChild(key);
  }

  return { lines, legend, ring, matrix, swarmColour, setSwarms, STATE };
})();
