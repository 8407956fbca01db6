// swarmnet serve: the page. Plain JavaScript; the server sends JSON and server-sent events.
"use strict";

const TOKEN = document.querySelector('meta[name="swarmnet-token"]').content;
const $ = sel => document.querySelector(sel);
const esc = s => String(s == null ? "" : s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const fmtTime = ms => ms == null ? "" : new Date(ms).toLocaleTimeString([], { hour12: false });
const fmtDate = ms => ms == null ? "" : new Date(ms).toLocaleString([], { hour12: false, year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit" });
const fmtDur = ms => ms == null ? "" : ms < 60000 ? `${(ms / 1000).toFixed(1)} s` : ms < 3600000 ? `${Math.floor(ms / 60000)} min ${Math.round(ms % 60000 / 1000)} s` : `${(ms / 3600000).toFixed(1)} h`;
const fmtNum = (v, d = 0) => v == null ? "–" : (+v).toFixed(d);
const verdictText = v => v === true ? "valid" : v === false ? "invalid" : v === "unknown" ? "unknown" : "no verdict";
const verdictClass = v => v === true ? "v-true" : v === false ? "v-false" : v === "unknown" ? "v-unknown" : "v-none";

async function getJSON(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" } });
  let body = null;
  try { body = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) throw new Error((body && body.error) || `${r.status} ${r.statusText}`);
  return body;
}

// ------------------------------------------------------------------ tabs

function route() {
  const h = location.hash.slice(1) || "live";
  const [tab, arg] = h.split("=", 2);
  const name = ["live", "runs", "nights", "run"].includes(tab) ? tab : "live";
  document.querySelectorAll(".tab").forEach(s => s.classList.toggle("hidden", s.id !== `tab-${name}`));
  document.querySelectorAll("#tabs a").forEach(a => a.classList.toggle("active", a.dataset.tab === (name === "run" ? "runs" : name)));
  if (name === "live") Live.start();
  if (name === "runs") Runs.load();
  if (name === "nights") Nights.load();
  if (name === "run") RunPage.load(decodeURIComponent(arg || ""));
}
window.addEventListener("hashchange", route);

// ------------------------------------------------------------------ live

const Live = (() => {
  let source = null, key = null, snap = null, series = [], started = false;
  const SPAN_MS = 5 * 60 * 1000;
  const RATE = [{ label: "stores/s (nodes)", colour: "#1f5fbf", key: "node_stores_per_s" },
                { label: "stores ok/s (users)", colour: "#2e9d5b", key: "stores_per_s" },
                { label: "receives/s", colour: "#8e44ad", key: "receives_per_s" },
                { label: "failed/s", colour: "#d43f3f", key: "failed_per_s" }];
  const LAT = [{ label: "store p50", colour: "#1f5fbf", key: "store_ms_p50" },
               { label: "store p95", colour: "#e08a00", key: "store_ms_p95" },
               { label: "delivery p50 (send → received)", colour: "#8e44ad", key: "delivery_ms_p50" }];

  async function start() {
    if (started) return;
    started = true;
    let live;
    try { live = await getJSON("/api/live"); } catch (e) { return empty(`cannot list live runs: ${e.message}`); }
    const sel = $("#live-run");
    sel.innerHTML = "";
    for (const r of live.runs) {
      const o = document.createElement("option");
      o.value = r.key; o.textContent = `${r.run_id}${r.scenario ? " · " + r.scenario : ""}${r.nodes ? " · " + r.nodes + " nodes" : ""}`;
      sel.appendChild(o);
    }
    if (!live.default) return empty("No live network in this runs directory. Start one with <code>swarmnet up</code> " +
                                     "(or a chaos run), then reload; stored runs are under <a href=\"#runs\">Runs</a>.");
    if (![...sel.options].some(o => o.value === live.default)) {
      const o = document.createElement("option"); o.value = live.default; o.textContent = live.default; sel.prepend(o);
    }
    sel.value = live.default;
    sel.onchange = () => connect(sel.value);
    connect(live.default);
  }

  function empty(html) {
    $("#live-empty").innerHTML = html;
    $("#live-empty").classList.remove("hidden");
    $("#live-body").classList.add("hidden");
    started = false;
  }

  function connect(k) {
    if (source) source.close();
    key = k; series = []; snap = null;
    $("#feed").innerHTML = "";
    source = new EventSource(`/api/live/stream?run=${encodeURIComponent(k)}`);
    source.addEventListener("full", e => { const m = JSON.parse(e.data); series = m.series || []; $("#feed").innerHTML = ""; addEvents(m.events, false); render(m.snapshot); });
    source.addEventListener("tick", e => { const m = JSON.parse(e.data); if (m.point) series.push(m.point); if (series.length > 700) series.shift(); addEvents(m.events, true); render(m.snapshot); });
    source.onopen = () => setConn(true);
    source.onerror = () => setConn(false);
  }

  function setConn(on) {
    $("#conn-dot").className = "dot " + (on ? "on" : "off");
    $("#conn-text").textContent = on ? "live" : "reconnecting…";
  }

  function addEvents(events, fresh) {
    const feed = $("#feed");
    for (const ev of events || []) {
      const li = document.createElement("li");
      li.className = ev.level + (fresh ? " fresh" : "");
      li.dataset.kind = ev.kind;
      li.innerHTML = `<time>${esc(fmtTime(ev.t))}</time><span class="k">${esc(ev.kind)}</span>`;
      li.appendChild(document.createTextNode(ev.text));
      feed.prepend(li);
    }
    while (feed.children.length > 400) feed.lastChild.remove();
  }

  function render(s) {
    if (!s || !s.nodes) { if (s && s.error) empty(`<b>The run cannot be read:</b> ${esc(s.error)}`); return; }
    snap = s;
    Plots.setSwarms(s.swarms);
    $("#live-empty").classList.add("hidden");
    $("#live-body").classList.remove("hidden");
    $("#live-facts").innerHTML = `<span class="pill">${esc(s.state)}</span> <span class="pill">links ${esc(s.links_mode)}</span>` +
      ` <span class="pill">registry height ${esc(s.registry.height ?? "–")}</span>` +
      ` <span class="pill">seed ${esc(s.seed)}</span>` +
      (s.controller !== "alive" ? ` <span class="pill" style="background:#fde2e2">controller gone</span>` : "");
    const counts = {};
    for (const n of s.nodes) counts[n.state] = (counts[n.state] || 0) + 1;
    $("#live-counts").innerHTML = Object.entries(counts).map(([st, c]) =>
      `<span class="pill"><i style="background:${Plots.STATE[st] || "#999"}"></i>${c} ${esc(st)}</span>`).join("") +
      `<span class="pill">${s.faults.length} fault${s.faults.length === 1 ? "" : "s"} on</span>`;
    renderSwarms(s);
    renderPartitionBox(s);
    Plots.lines($("#plot-rate"), series, RATE, SPAN_MS); Plots.legend($("#legend-rate"), RATE, series);
    Plots.lines($("#plot-lat"), series, LAT, SPAN_MS); Plots.legend($("#legend-lat"), LAT, series);
    Plots.ring($("#ring"), s);
    Plots.matrix($("#matrix"), s);
    $("#faults-on").innerHTML = s.faults.length ? "<table><tr><th>fault</th><th>kind</th><th>since</th><th>by</th><th>targets</th></tr>" +
      s.faults.map(f => `<tr><td>${esc(f.fault)}</td><td>${esc(f.kind)} <span class="sub">${esc(f.family)}</span></td><td>${esc(fmtTime(f.since_ms))}</td><td>${esc(f.by)}</td><td class="mono">${esc(f.targets)}</td></tr>`).join("") + "</table>"
      : '<p class="sub">No fault is on.</p>';
  }

  function renderSwarms(s) {
    const box = $("#swarms");
    const groups = s.swarms.map(w => ({ id: w.id, position: w.position, members: w.members }));
    const placed = new Set(groups.flatMap(g => g.members));
    const rest = s.nodes.filter(n => !placed.has(n.name)).map(n => n.name);
    if (rest.length) groups.push({ id: null, members: rest });
    const byName = Object.fromEntries(s.nodes.map(n => [n.name, n]));
    box.innerHTML = "";
    for (const g of groups) {
      const div = document.createElement("div");
      div.className = "swarm";
      div.dataset.swarm = g.id || "none";
      const colour = Plots.swarmColour(g.id);
      div.innerHTML = `<header><span class="sw-dot" style="background:${colour}"></span><b>${g.id ? "swarm " + esc(g.id.slice(0, 8)) + "…" : "no swarm"}</b>` +
        `<span class="sub">${g.members.length} node${g.members.length === 1 ? "" : "s"}${g.id ? " · " + esc(g.id) : ""}</span></header><div class="nodes"></div>`;
      const nodes = div.querySelector(".nodes");
      for (const name of g.members) nodes.appendChild(nodeCard(byName[name], s.can_act));
      box.appendChild(div);
    }
  }

  function nodeCard(n, canAct) {
    const d = document.createElement("div");
    d.className = "node"; d.dataset.node = n.name; d.dataset.state = n.state;
    const extra = n.state === "skewed" ? ` (${n.clock_offset_ms > 0 ? "+" : ""}${(n.clock_offset_ms / 1000).toFixed(0)} s)` : "";
    d.innerHTML = `<div class="nm"><span>${esc(n.name)}</span><span class="st">${esc(n.state)}${esc(extra)}</span></div>
      <div class="kv"><span>messages</span><b>${fmtNum(n.messages)}</b><span>connections</span><b>${fmtNum(n.connections)}</b>
      <span>CPU</span><b>${n.cpu == null ? "–" : n.cpu.toFixed(0) + " %"}</b><span>stores/s</span><b>${fmtNum(n.stores_per_s, 1)}</b></div>
      <div class="ops"></div>`;
    const ops = d.querySelector(".ops");
    const dead = ["killed", "down"].includes(n.state), paused = n.state === "paused";
    const btn = (label, action, cls, enabled) => {
      const b = document.createElement("button");
      b.className = `btn small ${cls || ""}`; b.textContent = label; b.dataset.action = action;
      b.disabled = !canAct || !enabled;
      b.onclick = () => act({ action, node: n.name }, `${action} ${n.name}`);
      ops.appendChild(b);
    };
    btn("kill", "kill", "danger", !dead);
    if (paused) btn("resume", "resume", "", true); else btn("pause", "pause", "", !dead);
    btn("restart", "restart", "", true);
    return d;
  }

  function renderPartitionBox(s) {
    const a = $("#part-a"), b = $("#part-b");
    const ids = s.swarms.map(w => w.id);
    const cur = [a.value, b.value];
    if (a.dataset.ids !== ids.join(",")) {
      for (const [sel, i] of [[a, 0], [b, 1]]) {
        sel.innerHTML = ids.map(id => `<option value="${esc(id)}">swarm ${esc(id.slice(0, 8))}…</option>`).join("");
        sel.value = ids.includes(cur[i]) ? cur[i] : ids[Math.min(i, ids.length - 1)] || "";
      }
      a.dataset.ids = ids.join(",");
    }
    const can = s.can_act && s.links_mode === "toxiproxy" && ids.length >= 2;
    $("#btn-partition").disabled = !can;
    $("#btn-partition").title = s.links_mode !== "toxiproxy" ? "partitions need Toxiproxy links (this run uses --links direct)"
      : ids.length < 2 ? "needs two swarms" : "cut every node link between the two swarms";
    $("#btn-heal").disabled = !s.can_act;
  }

  async function act(body, what) {
    const msg = $("#act-msg");
    msg.className = "actmsg"; msg.textContent = `${what}: asking the controller…`;
    try {
      const r = await fetch("/api/act", { method: "POST", headers: { "Content-Type": "application/json", "X-Swarmnet-Token": TOKEN },
                                          body: JSON.stringify({ run: key, ...body }) });
      const out = await r.json().catch(() => ({}));
      if (!r.ok) throw new Error(out.error || `${r.status}`);
      const res = out.result || {};
      msg.textContent = `${what}: done` + (res.state ? ` (now ${res.state})` : "") +
        (res.healed ? ` (${res.healed.length} healed${res.failed && res.failed.length ? ", " + res.failed.length + " failed" : ""})` : "") +
        (res.proxies != null ? ` (${res.proxies} links cut)` : "");
    } catch (e) {
      msg.className = "actmsg error"; msg.textContent = `${what}: ${e.message}`;
    }
  }

  $("#btn-heal").onclick = () => act({ action: "heal" }, "heal all");
  $("#btn-partition").onclick = () => act({ action: "partition", swarms: [$("#part-a").value, $("#part-b").value] }, "partition");
  window.addEventListener("resize", () => snap && render(snap));
  return { start };
})();

// ------------------------------------------------------------------ runs

const Runs = (() => {
  let rows = [];
  async function load() {
    try {
      const out = await getJSON("/api/runs");
      rows = out.runs;
      $("#runs-error").classList.add("hidden");
      fillSelect($("#f-scenario"), rows.map(r => r.scenario).filter(Boolean), "every scenario");
      fillSelect($("#f-group"), rows.map(r => r.group || "."), "every folder");
      $("#runs-count").dataset.took = out.took_ms;
      render();
    } catch (e) {
      $("#runs-error").textContent = `The runs cannot be listed: ${e.message}`;
      $("#runs-error").classList.remove("hidden");
    }
  }
  function fillSelect(sel, values, all) {
    const cur = sel.value;
    sel.innerHTML = `<option value="">${all}</option>` + [...new Set(values)].sort().map(v => `<option>${esc(v)}</option>`).join("");
    sel.value = cur;
  }
  function render() {
    const text = $("#f-text").value.trim().toLowerCase(), kind = $("#f-kind").value, sc = $("#f-scenario").value;
    const vd = $("#f-verdict").value, grp = $("#f-group").value;
    const shown = rows.filter(r =>
      (!kind || r.kind === kind) && (!sc || r.scenario === sc) && (!grp || (r.group || ".") === grp) &&
      (!vd || (vd === "none" ? r.valid == null : String(r.valid) === vd)) &&
      (!text || [r.key, r.scenario, r.seed, ...(r.inject_bugs || [])].join(" ").toLowerCase().includes(text)));
    const tb = $("#runs-table tbody");
    tb.innerHTML = shown.slice(0, 2000).map(r => `<tr data-key="${esc(r.key)}">
      <td><span class="mono">${esc(r.key.split("/").pop())}</span>${r.run_id !== r.key.split("/").pop() ? ` <span class="sub mono">${esc(r.run_id)}</span>` : ""}${r.group ? ` <span class="sub">in ${esc(r.group)}/</span>` : ""}${r.live ? ' <span class="pill" style="background:#e1f5e8">live</span>' : ""}${r.error ? ` <span class="why">${esc(r.error)}</span>` : ""}</td>
      <td>${esc(r.kind)}</td>
      <td>${esc(r.scenario || "")}${(r.inject_bugs || []).map(b => ` <span class="chip c-unknown">+${esc(b)}</span>`).join("")}</td>
      <td class="num mono">${esc(r.seed ?? "")}</td>
      <td><span class="v ${verdictClass(r.valid)}">${verdictText(r.valid)}</span></td>
      <td>${Object.entries(r.checkers || {}).map(([n, v]) => `<span class="chip c-${v === true ? "true" : v === false ? "false" : "unknown"}">${esc(n)}</span>`).join("")}</td>
      <td class="num nowrap">${r.nodes} nodes · ${r.users} users</td>
      <td class="num nowrap">${esc(fmtDur(r.duration_ms))}</td>
      <td class="num nowrap">${esc(fmtDate(r.when_ms))}</td></tr>`).join("");
    $("#runs-count").textContent = `${shown.length} of ${rows.length} runs` + ($("#runs-count").dataset.took ? ` · listed in ${$("#runs-count").dataset.took} ms` : "");
  }
  $("#runs-table tbody").addEventListener("click", e => {
    const tr = e.target.closest("tr[data-key]");
    if (tr) location.hash = "run=" + encodeURIComponent(tr.dataset.key);
  });
  for (const id of ["#f-text", "#f-kind", "#f-scenario", "#f-verdict", "#f-group"]) $(id).addEventListener("input", render);
  return { load };
})();

// ------------------------------------------------------------------ one run

const RunPage = (() => {
  let key = null;
  async function load(k) {
    key = k;
    const body = $("#run-body");
    body.innerHTML = '<p class="sub">loading…</p>';
    $("#run-error").classList.add("hidden");
    let d;
    try { d = await getJSON(`/api/run?run=${encodeURIComponent(k)}`); } catch (e) {
      body.innerHTML = "";
      $("#run-error").textContent = e.message; $("#run-error").classList.remove("hidden");
      return;
    }
    const r = d.row;
    const faults = d.faults.length ? `<table><tr><th>fault</th><th>kind</th><th>start (s)</th><th>end (s)</th><th>status</th><th>targets</th></tr>` +
      d.faults.map(f => `<tr><td>${esc(f.fault)}</td><td>${esc(f.kind)}</td><td class="num">${esc(f.start_s ?? "")}</td><td class="num">${esc(f.end_s ?? "")}</td><td>${esc(f.status)}</td><td class="mono">${esc(JSON.stringify(f.targets)).slice(0, 300)}</td></tr>`).join("") + "</table>" : '<p class="sub">No faults recorded.</p>';
    const checkers = d.checkers.length ? "<table><tr><th>checker</th><th>valid</th><th>counts</th></tr>" + d.checkers.map(c =>
      `<tr><td>${esc(c.name)}</td><td><span class="v ${verdictClass(c.valid)}">${verdictText(c.valid)}</span></td><td class="mono">${esc(Object.entries(c.counts).map(([k2, v]) => `${k2} ${v}`).join(", "))}${c.error ? ` <span class="why">${esc(c.error)}</span>` : ""}</td></tr>`).join("") + "</table>"
      : '<p class="sub">No verdict yet (<code>swarmnet check</code> makes one).</p>';
    const fl = d.flagged;
    const flagged = fl.total ? `<ol class="flagged-list">` + fl.messages.map(m =>
      `<li data-key="${esc(m.key)}"><div class="fh"><code>${esc(m.key)}</code><span class="why">${esc(m.flags.join("; "))}</span></div></li>`).join("") + "</ol>" +
      (fl.total > fl.messages.length ? `<p class="sub">first ${fl.messages.length} of ${fl.total} shown (the report lists them all)</p>` : "")
      : '<p class="sub">No message was flagged by any checker.</p>';
    body.innerHTML = `
      <div class="card"><h2><span class="mono">${esc(r.run_id)}</span> <span class="v ${verdictClass(r.valid)}">${verdictText(r.valid)}</span></h2>
        <div class="facts">
          <div><span>scenario</span>${esc(r.scenario || "–")}${(r.inject_bugs || []).map(b => ` <span class="chip c-unknown">+${esc(b)}</span>`).join("")}</div>
          <div><span>seed</span><span class="mono">${esc(r.seed ?? "–")}</span></div><div><span>kind</span>${esc(r.kind)}</div>
          <div><span>network</span>${r.nodes} nodes · ${r.users} users · links ${esc(r.links_mode || "–")}</div>
          <div><span>started</span>${esc(fmtDate(r.when_ms))}${r.kind === "sim" ? ' <span class="sub">(virtual clock: ' + esc(fmtDate(r.started_ms)) + ")</span>" : ""}</div><div><span>duration</span>${esc(fmtDur(r.duration_ms) || "–")}</div>
          <div><span>on disk</span>${(d.disk_bytes / 1048576).toFixed(1)} MiB</div><div><span>history</span>${d.history_records} records</div>
          <div style="grid-column: span 2"><span>directory</span><span class="mono">${esc(d.path)}</span></div>
        </div></div>
      <div class="card"><h3>Verdict per checker</h3>${checkers}</div>
      <div class="card"><h3>Faults</h3>${faults}</div>
      <div class="card"><h3>Flagged messages (${fl.total}) <span class="sub">click one for its journey</span></h3>${fl.unjudged.map(u => `<p class="why">not judged by ${esc(u)}</p>`).join("")}<div class="scrollbox">${flagged}</div></div>
      <div class="card"><h3>Find a message</h3><form class="lookup" id="lookup"><input type="text" id="lookup-key" placeholder="msg_id (alice-3) or hash (or a unique start of it)"><button class="btn">Show its journey</button></form><div id="lookup-out"></div></div>
      <div class="card"><h3>Report <span class="sub">report.html as the run wrote it</span></h3>${r.report ? `<iframe class="report" title="report" src="/api/run/report?run=${encodeURIComponent(k)}"></iframe>` : '<p class="sub">This run has no report.html.</p>'}</div>`;
    body.querySelectorAll(".flagged-list > li .fh").forEach(h => h.addEventListener("click", () => toggleJourney(h.parentElement)));
    $("#lookup").addEventListener("submit", async e => {
      e.preventDefault();
      const out = $("#lookup-out");
      out.innerHTML = '<p class="sub">tracing…</p>';
      out.replaceChildren(await journeyBox($("#lookup-key").value));
    });
  }

  async function toggleJourney(li) {
    const open = li.querySelector(".journey");
    if (open) { open.remove(); return; }
    const wait = document.createElement("div");
    wait.className = "journey"; wait.innerHTML = '<p class="sub">tracing the message through every node\'s capture…</p>';
    li.appendChild(wait);
    wait.replaceWith(await journeyBox(li.dataset.key));
  }

  async function journeyBox(message) {
    const div = document.createElement("div");
    div.className = "journey";
    try {
      const r = await fetch(`/api/run/journey?run=${encodeURIComponent(key)}&message=${encodeURIComponent(message)}`);
      const j = await r.json();
      if (j.html) {
        div.innerHTML = `<style>${j.css}</style><p><b>${esc(j.msg_id || j.hash)}</b>: ${esc((j.outcomes || []).join(", "))} <span class="sub">traced in ${j.seconds} s</span></p>` + j.html;
      } else div.innerHTML = `<p class="why">${esc(j.error || "no journey")}</p>`;
    } catch (e) { div.innerHTML = `<p class="why">${esc(e.message)}</p>`; }
    return div;
  }
  return { load };
})();

// ------------------------------------------------------------------ nights

const Nights = (() => {
  async function load() {
    const body = $("#nights-body");
    let out;
    try { out = await getJSON("/api/nights"); } catch (e) { body.innerHTML = `<div class="notice error">${esc(e.message)}</div>`; return; }
    if (!out.folders.length) {
      body.innerHTML = '<div class="notice">No nightly results here: <code>swarmnet chaos nightly</code> writes them to <code>runs/nightly</code> (and <code>nightly.json</code> beside them).</div>';
      return;
    }
    body.innerHTML = out.folders.map(f => {
      const nights = f.nights.slice(0, 30);
      const head = `<tr><th>scenario / canary</th>${nights.map(n => `<th>${esc(n.label)}<br><span class="sub">${n.passed} pass · ${n.failed} fail</span></th>`).join("")}</tr>`;
      const rowsHtml = f.names.map(name => `<tr><td>${esc(name)}</td>${nights.map(n => {
        const es = n.entries.filter(e => e.name === name);
        if (!es.length) return '<td><span class="cell none">·</span></td>';
        return "<td>" + es.map(e => {
          const label = `${e.passed ? "pass" : "FAIL"} · ${e.seed ?? "?"}`;
          const tip = `${name}, seed ${e.seed}: ${e.passed ? "pass" : "fail"}` + (e.failing && e.failing.length ? ` (failing: ${e.failing.join(", ")})` : "") + (e.canary ? `; must fail ${e.expect_failing}` : "") + (e.error ? `; ${e.error}` : "");
          return e.run ? `<a class="cell ${e.passed ? "pass" : "fail"}" title="${esc(tip)}" href="#run=${encodeURIComponent(e.run)}">${esc(label)}</a>`
                       : `<span class="cell ${e.passed ? "pass" : "fail"}" title="${esc(tip)}">${esc(label)}</span>`;
        }).join(" ") + "</td>";
      }).join("")}</tr>`).join("");
      const sim = f.summary ? `<p>last sweep: ${esc(f.summary.runs)} runs, ${esc((f.summary.failing || []).length)} failing, canaries blind: ${esc((f.summary.canaries_blind || []).join(", ") || "none")} (${esc(f.summary.wall_s)} s)</p>` : "";
      return `<div class="card"><h2>${esc(f.folder)} <span class="sub">${f.nights.length} night${f.nights.length === 1 ? "" : "s"}; newest first; a canary passes when its checker catches its bug</span></h2>${sim}${f.error ? `<p class="why">${esc(f.error)}</p>` : ""}
        <div style="overflow-x:auto"><table class="nightgrid">${head}${rowsHtml}</table></div></div>`;
    }).join("");
  }
  return { load };
})();

route();
