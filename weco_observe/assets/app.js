// weco-observe views: renders a run (tree, chart, step details with diffs) from JSON.
// Used by the self-contained report (data embedded, no network), by the local UI (data
// fetched from /api, refreshed when the journal changes) and by the relay's team
// dashboard (the UI behind a key, over every box's runs). Builds the DOM with
// textContent only: names, keys, descriptions and code are user data.
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var ROW = 28, LANE = 16, PAD = 12;
  var MODE = document.body.getAttribute("data-mode");
  var DASHBOARD = document.body.getAttribute("data-dashboard") === "1";
  var state = { view: null, selected: null, metric: null, diffs: {}, runs: [], runId: null, version: null,
    filters: { key: "", metric: "", goal: "" }, filterSig: null, ended: false };

  function el(tag, attrs, kids) {
    var n = document.createElement(tag);
    for (var k in attrs || {}) {
      if (k === "text") n.textContent = attrs[k];
      else if (k === "cls") n.className = attrs[k];
      else if (k.slice(0, 2) === "on") n.addEventListener(k.slice(2), attrs[k]);
      else n.setAttribute(k, attrs[k]);
    }
    (kids || []).forEach(function (c) { if (c != null) n.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return n;
  }
  function svg(tag, attrs) {
    var n = document.createElementNS(SVG, tag);
    for (var k in attrs || {}) n.setAttribute(k, attrs[k]);
    return n;
  }
  function fmt(v) {
    if (v == null) return "–";
    if (Number.isInteger(v)) return String(v);
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(3);
    return String(Number(v.toPrecision(5)));
  }
  function ago(iso) {
    if (!iso) return "–";
    var s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 60) return Math.floor(s) + "s ago";
    if (s < 3600) return Math.floor(s / 60) + "m ago";
    if (s < 86400) return Math.floor(s / 3600) + "h ago";
    return Math.floor(s / 86400) + "d ago";
  }
  function whoText(key) { return key == null ? "an unknown key" : key; }
  function kind(s) { return s.step === 0 ? "base" : s.status === "failed" ? "failed" : "kept"; }
  function label(s) { return s.step === 0 ? "baseline" : s.status === "failed" ? "failed" : "kept"; }

  // ---- header and summary cards -------------------------------------------------
  function header(v) {
    var r = v.run, imp = v.best && v.best.improvement;
    var sync = r.pending || r.rejected
      ? (r.pending + " pending" + (r.rejected ? ", " + r.rejected + " rejected" : "")) : (r.sync === "local" ? "not synced" : r.sync);
    // A relay's run says who made it and the id its box knows it by; its "server" is the upstream.
    var ids = "key" in r
      ? "by " + whoText(r.key) + "  ·  relay id " + (r.relay_id || "–") + "  ·  upstream " + (r.server_id || "not forwarded yet") + "  "
      : "local " + r.id + "  ·  server " + (r.server_id || "not synced yet") + "  ";
    var h = el("header", { cls: "run" }, [
      el("h1", { text: r.name || "(unnamed run)" }),
      el("div", { cls: "ids" }, [
        ids,
        el("span", { cls: "badge " + (r.rejected ? "rejected" : r.pending ? "pending" : r.sync === "synced" ? "synced" : ""), text: sync }),
      ]),
    ]);
    // As `weco observe runs` writes it: a run first seen by its server id has "?" for both.
    var goal = { maximize: "max", minimize: "min" }[r.goal] || "?";
    var bestCard = el("div", { cls: "card", id: "best-card" }, [
      el("div", { cls: "k", text: "Best " + (r.metric || "?") + " (" + goal + ")" }),
      el("div", { cls: "v good", text: v.best ? fmt(v.best.value) : "–" }),
      el("div", { cls: "s", text: v.best ? "step " + v.best.step : r.goal ? "no kept step has a value yet" : "goal unknown" }),
    ]);
    var impText = "–", impCls = "v", impSub = "needs a baseline value (step 0)";
    if (imp) {
      impText = imp.percent == null ? (imp.better_by >= 0 ? "+" : "") + fmt(imp.better_by)
        : (imp.percent >= 0 ? "+" : "") + imp.percent.toFixed(1) + "%";
      impCls = "v " + (imp.better_by > 0 ? "good" : imp.better_by < 0 ? "bad" : "");
      impSub = "vs baseline " + fmt(imp.baseline) + " (" + (imp.delta >= 0 ? "+" : "") + fmt(imp.delta) + ")";
    }
    var cards = el("div", { cls: "cards" }, [
      bestCard,
      el("div", { cls: "card" }, [el("div", { cls: "k", text: "Improvement" }), el("div", { cls: impCls, text: impText }), el("div", { cls: "s", text: impSub })]),
      el("div", { cls: "card" }, [el("div", { cls: "k", text: "Steps" }), el("div", { cls: "v", text: String(r.steps) }),
        el("div", { cls: "s", text: r.failed + " failed" + (r.last_step != null ? " · last step " + r.last_step : "") })]),
      el("div", { cls: "card" }, [el("div", { cls: "k", text: "Last activity" }), el("div", { cls: "v", text: ago(r.last_activity) }),
        el("div", { cls: "s", text: r.last_activity ? r.last_activity.replace("T", " ").replace("Z", " UTC") : "" })]),
    ]);
    return [h, cards];
  }

  // ---- chart ----------------------------------------------------------------------
  function niceTicks(lo, hi, n) {
    if (lo === hi) { lo -= Math.abs(lo) * 0.05 || 1; hi += Math.abs(hi) * 0.05 || 1; }
    var span = hi - lo, step = Math.pow(10, Math.floor(Math.log10(span / n))), err = span / n / step;
    if (err >= 7.5) step *= 10; else if (err >= 3.5) step *= 5; else if (err >= 1.5) step *= 2;
    var ticks = [];
    for (var t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
    return { lo: lo, hi: hi, ticks: ticks };
  }

  function chart(v) {
    var metrics = v.metrics.length ? v.metrics : (v.run.metric ? [v.run.metric] : []);
    if (metrics.indexOf(state.metric) < 0) state.metric = metrics[0];
    var select = el("select", { id: "metric-select", "aria-label": "metric", onchange: function () { state.metric = this.value; redrawChart(); } },
      metrics.map(function (m) { var o = el("option", { value: m, text: m + (m === v.run.metric ? " (primary)" : "") }); if (m === state.metric) o.selected = true; return o; }));
    var legend = el("span", { cls: "legend" }, [
      el("span", {}, [el("i", { style: "background:var(--kept)" }), "value"]),
      el("span", { id: "legend-best" }, [el("i", { style: "background:var(--best)" }), "best so far"]),
      el("span", {}, [el("i", { style: "background:var(--failed);height:3px" }), "failed (✕; ▲▼ off the scale)"]),
    ]);
    var box = el("div", { cls: "chart", id: "chart" });
    var panel = el("section", { cls: "panel" }, [el("h3", {}, [el("span", { text: "Metric over steps" }), legend, el("span", { cls: "grow" }), select]), box]);
    return panel;
  }

  function redrawChart() {
    var v = state.view, box = document.getElementById("chart");
    if (!v || !box) return;
    box.textContent = "";
    var m = state.metric, primary = m === v.run.metric;
    var W = Math.max(box.clientWidth - 16, 300), H = 270, L = 58, R = 16, T = 14, B = 30;
    var root = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "chart of " + m, id: "chart-svg" });
    box.appendChild(root);
    var pts = v.steps.filter(function (s) { return typeof s.metrics[m] === "number"; });
    document.getElementById("legend-best").style.display = "none";
    if (!pts.length) {
      var t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", "class": "nodata" });
      t.textContent = m ? "No step reports " + m + " yet" : "No metrics logged yet";
      root.appendChild(t);
      return;
    }
    var first = v.steps[0].step, last = v.steps[v.steps.length - 1].step;
    var xs = last === first ? 1 : last - first;
    // Failed steps often report a placeholder (0.0): keep them out of the y range so they cannot flatten the chart.
    var ranged = pts.filter(function (s) { return s.status !== "failed"; });
    if (!ranged.length) ranged = pts;
    var vals = ranged.map(function (s) { return s.metrics[m]; });
    var vmin = Math.min.apply(null, vals), vmax = Math.max.apply(null, vals), pad = (vmax - vmin) * 0.06;
    var y = niceTicks(vmin - pad, vmax + pad, 5);  // a margin keeps the extreme points off the frame
    var lo = Math.min(y.lo, y.ticks[0]), hi = Math.max(y.hi, y.ticks[y.ticks.length - 1]);
    // A failed value outside that range is drawn in a band beyond a dashed edge, never at the edge, where
    // it would read as the edge's value.
    function off(s) { var val = s.metrics[m]; return s.status === "failed" ? (val > hi ? "above" : val < lo ? "below" : null) : null; }
    var above = pts.some(function (s) { return off(s) === "above"; }), below = pts.some(function (s) { return off(s) === "below"; });
    var BAND = 18, top = T + (above ? BAND : 0), bottom = H - B - (below ? BAND : 0);
    function X(step) { return L + (step - first) / xs * (W - L - R); }
    function Y(val) { return top + (1 - (val - lo) / (hi - lo || 1)) * (bottom - top); }
    var axis = svg("g", { "class": "axis" });
    y.ticks.forEach(function (t) {
      axis.appendChild(svg("line", { x1: L, x2: W - R, y1: Y(t), y2: Y(t), "class": "grid" }));
      var tx = svg("text", { x: L - 8, y: Y(t) + 4, "text-anchor": "end" }); tx.textContent = fmt(t); axis.appendChild(tx);
    });
    niceTicks(first, last, 8).ticks.filter(function (t) { return Number.isInteger(t) && t >= first && t <= last; }).forEach(function (t) {
      var tx = svg("text", { x: X(t), y: H - 10, "text-anchor": "middle" }); tx.textContent = String(t); axis.appendChild(tx);
    });
    root.appendChild(axis);
    var bands = svg("g", { "class": "offscale" });
    [[above, top, T + BAND / 2], [below, bottom, H - B - BAND / 2]].forEach(function (band) {
      if (!band[0]) return;
      bands.appendChild(svg("line", { x1: L, x2: W - R, y1: band[1], y2: band[1], "class": "offedge" }));
      var tx = svg("text", { x: L - 8, y: band[2] + 4, "text-anchor": "end" }); tx.textContent = "off scale"; bands.appendChild(tx);
    });
    root.appendChild(bands);
    var kept = pts.filter(function (s) { return s.status !== "failed"; });
    if (kept.length > 1) root.appendChild(svg("path", { "class": "series", d: kept.map(function (s, i) { return (i ? "L" : "M") + X(s.step) + "," + Y(s.metrics[m]); }).join("") }));
    if (primary) {
      var d = "", prev = null;
      v.steps.forEach(function (s) {
        if (s.best_so_far == null) return;
        if (prev == null) d += "M" + X(s.step) + "," + Y(s.best_so_far);
        else d += "L" + X(s.step) + "," + Y(prev) + "L" + X(s.step) + "," + Y(s.best_so_far);
        prev = s.best_so_far;
      });
      if (prev != null) d += "L" + X(last) + "," + Y(prev);
      if (d) root.appendChild(svg("path", { "class": "bestline", d: d, id: "best-line" }));
      if (d) document.getElementById("legend-best").style.display = "";  // no goal, no line
    }
    var r = pts.length > 300 ? 2.2 : 3.6;
    pts.forEach(function (s) {
      var val = s.metrics[m], g, title = svg("title");
      title.textContent = "step " + s.step + " (" + label(s) + "): " + m + " " + fmt(val) + (s.description ? " — " + s.description : "");
      var side = off(s);
      if (side) {
        var ox = X(s.step), oy = side === "above" ? T + BAND / 2 : H - B - BAND / 2, h = r + 1.5, tip = side === "above" ? -h : h;
        title.textContent += " (off the scale)";
        g = svg("path", { d: "M" + ox + "," + (oy + tip) + "L" + (ox + h) + "," + (oy - tip) + "L" + (ox - h) + "," + (oy - tip) + "Z", "class": "fail off", "data-step": s.step });
      } else if (s.status === "failed") {
        var cx = X(s.step), cy = Y(val), k = r + 1.2;
        g = svg("path", { d: "M" + (cx - k) + "," + (cy - k) + "L" + (cx + k) + "," + (cy + k) + "M" + (cx - k) + "," + (cy + k) + "L" + (cx + k) + "," + (cy - k), "class": "fail", "data-step": s.step });
      } else {
        g = svg("circle", { cx: X(s.step), cy: Y(val), r: s.is_best && primary ? r + 2.5 : r,
          "class": "pt" + (s.is_best && primary ? " best" : "") + (s.step === state.selected ? " sel" : ""), "data-step": s.step });
      }
      g.appendChild(title);
      g.addEventListener("click", function () { select(s.step, true); });
      root.appendChild(g);
    });
  }

  // ---- tree -----------------------------------------------------------------------
  function tree(v) {
    var lanes = Math.max(v.lanes || 1, 1), gw = PAD + lanes * LANE;
    var rowOf = {}, laneOf = {};
    v.steps.forEach(function (s, i) { rowOf[s.step] = i; laneOf[s.step] = s.lane; });
    var H = v.steps.length * ROW;
    var g = svg("svg", { "class": "graph", width: gw, height: H, viewBox: "0 0 " + gw + " " + H, id: "tree-svg" });
    function cx(l) { return PAD / 2 + l * LANE + LANE / 2; }
    function cy(i) { return i * ROW + ROW / 2; }
    var edges = "";
    v.steps.forEach(function (s) {
      if (s.parent_step == null || !(s.parent_step in rowOf)) return;
      var pr = rowOf[s.parent_step], px = cx(laneOf[s.parent_step]), py = cy(pr), x = cx(s.lane), y = cy(rowOf[s.step]);
      if (px === x) edges += "M" + px + "," + py + "L" + x + "," + y;
      else { var my = py + ROW * 0.9; edges += "M" + px + "," + py + "C" + px + "," + (py + ROW * 0.6) + " " + x + "," + (py + ROW * 0.3) + " " + x + "," + my + "L" + x + "," + y; }
    });
    g.appendChild(svg("path", { "class": "edge", d: edges }));
    var rows = el("div", { cls: "rows" });
    v.steps.forEach(function (s, i) {
      var k = kind(s), x = cx(s.lane), y = cy(i);
      if (s.is_best) g.appendChild(svg("circle", { cx: x, cy: y, r: 8.5, "class": "halo" }));
      var node = svg("circle", { cx: x, cy: y, r: s.is_best ? 5.5 : 4.5, "class": "node " + (s.is_best ? "best" : k), "data-step": s.step });
      g.appendChild(node);
      var val = s.value;
      var row = el("div", { cls: "row" + (s.step === state.selected ? " sel" : ""), "data-step": s.step, style: "padding-left:" + gw + "px",
        onclick: function () { select(s.step, false); } }, [
        el("span", { cls: "n", text: "#" + s.step }),
        el("span", { cls: "st " + (s.is_best ? "best" : k), text: s.is_best ? "best" : label(s) }),
        el("span", { cls: "val" + (s.is_best ? " isbest" : ""), text: val == null ? "–" : fmt(val) }),
        el("span", { cls: "d", text: s.description || (s.step === 0 ? "baseline" : ""), title: s.description || "" }),
        s.branched_from != null ? el("span", { cls: "br", text: "↳ from " + s.branched_from }) : null,
        s.sync === "rejected" ? el("span", { cls: "sy rejected", text: "rejected", title: s.sync_error || "" }) : null,
      ]);
      rows.appendChild(row);
    });
    var wrap = el("div", { cls: "tree", id: "tree", style: "height:" + H + "px" }, [g, rows]);
    var box = el("div", { cls: "treebox", id: "treebox" }, [wrap]);
    return el("section", { cls: "panel" }, [
      el("h3", {}, [el("span", { text: "Tree" }), el("span", { cls: "grow" }), el("span", { cls: "legend", text: v.steps.length + " steps · ↑↓ to move" })]), box]);
  }

  // ---- step detail ----------------------------------------------------------------
  function detailPanel() { return el("section", { cls: "panel detail", id: "detail" }, [el("h3", { id: "detail-title", text: "Step" }), el("div", { cls: "body", id: "detail-body" })]); }

  function renderDiff(files, body) {
    if (!files.length) { body.appendChild(el("div", { cls: "meta", text: "No code change against the parent." })); return; }
    files.forEach(function (f) {
      var add = 0, del = 0;
      f.lines.forEach(function (l) { if (l[0] === "+" && l.slice(0, 3) !== "+++") add++; else if (l[0] === "-" && l.slice(0, 3) !== "---") del++; });
      var pre = el("div", { cls: "diff" });
      var LIMIT = 1500, shown = 0;
      function more(from) {
        for (var i = from; i < f.lines.length && i < from + LIMIT; i++) {
          var l = f.lines[i];
          if (l.slice(0, 3) === "+++" || l.slice(0, 3) === "---") continue;
          pre.appendChild(el("div", { cls: l[0] === "+" ? "a" : l[0] === "-" ? "r" : l[0] === "@" ? "h" : "", text: l }));
          shown = i + 1;
        }
        if (shown < f.lines.length) pre.appendChild(el("button", { cls: "more", text: "show " + (f.lines.length - shown) + " more lines",
          onclick: function () { this.remove(); more(shown); } }));
      }
      more(0);
      body.appendChild(el("div", { cls: "file" }, [
        el("div", { cls: "fh" }, [el("span", { text: f.path + (f.status !== "modified" ? " (" + f.status + ")" : "") }),
          el("span", { cls: "stat" }, [el("span", { cls: "good", text: "+" + add }), " ", el("span", { cls: "bad", text: "−" + del })])]),
        pre]));
    });
  }

  function getDiff(step, cb) {
    if (state.diffs[step] !== undefined) return cb(state.diffs[step]);
    if (MODE !== "ui") return cb(null);
    fetch("api/runs/" + encodeURIComponent(state.runId) + "/diff?step=" + step).then(function (r) {
      if (!r.ok) throw new Error(r.status);  // an error's detail is no diff
      return r.json();
    }).then(function (d) {
      state.diffs[step] = d.files || []; cb(state.diffs[step]);
    }).catch(function () { cb(null); });
  }

  // The step a metric of step s is compared with: its nearest ancestor that did not fail and reports
  // the metric. A failed step's value is often a placeholder (0.0), and a step may not report every metric.
  function reference(v, s, metric) {
    var byStep = {}, seen = {};
    v.steps.forEach(function (x) { byStep[x.step] = x; });
    for (var p = byStep[s.parent_step]; p && !seen[p.step]; p = byStep[p.parent_step]) {
      seen[p.step] = true;
      if (p.status !== "failed" && typeof p.metrics[metric] === "number") return p;
    }
    return null;
  }

  function renderDetail() {
    var v = state.view, s = null;
    if (!v) return;
    v.steps.forEach(function (x) { if (x.step === state.selected) s = x; });
    var title = document.getElementById("detail-title"), body = document.getElementById("detail-body");
    body.textContent = "";
    if (!s) { title.textContent = "Step"; body.appendChild(el("div", { cls: "meta", text: "Select a step." })); return; }
    var bits = [label(s)];
    if (s.is_best) bits.unshift("best");
    if (s.parent_step != null) bits.push("parent " + s.parent_step);
    title.textContent = (s.step === 0 ? "Baseline (step 0)" : "Step " + s.step) + " · " + bits.join(" · ");
    body.appendChild(s.description ? el("p", { cls: "desc", text: s.description }) : el("p", { cls: "desc meta", text: "No description." }));
    var names = Object.keys(s.metrics);
    if (names.length) {
      body.appendChild(el("h4", { text: "Metrics" }));
      body.appendChild(el("table", { cls: "metrics" }, names.map(function (n) {
        var ref = typeof s.metrics[n] === "number" ? reference(v, s, n) : null, dv = ref ? s.metrics[n] - ref.metrics[n] : null;
        return el("tr", {}, [el("td", { text: n + (n === v.run.metric ? " ★" : "") }), el("td", { cls: "num", text: fmt(s.metrics[n]) }),
          el("td", { cls: "num meta", text: ref ? (dv >= 0 ? "+" : "") + fmt(dv) + " vs step " + ref.step : "" })]);
      })));
    }
    var sync = s.sync === "delivered" ? "synced" : s.sync;
    body.appendChild(el("div", { cls: "meta", text: "logged " + (s.updated_at || "").replace("T", " ").replace("Z", " UTC") + " · sync: " + sync +
      (s.sync_error ? " (" + s.sync_error + ")" : "") + (s.code_step != null && s.code_step !== s.step ? " · code from step " + s.code_step : "") }));
    body.appendChild(el("h4", { text: s.parent_step == null ? "Code" : "Diff against step " + s.parent_step }));
    if (s.parent_step == null) { body.appendChild(el("div", { cls: "meta", text: (s.files || []).length ? "Files: " + s.files.join(", ") : "No code." })); return; }
    var holder = el("div", { id: "diff" });
    body.appendChild(holder);
    getDiff(s.step, function (files) {
      if (state.selected !== s.step) return;
      if (files == null) holder.appendChild(el("div", { cls: "meta", text: "Diff unavailable." }));
      else renderDiff(files, holder);
    });
  }

  function select(step, scroll) {
    state.selected = step;
    document.querySelectorAll(".row.sel").forEach(function (r) { r.classList.remove("sel"); });
    var row = document.querySelector('.row[data-step="' + step + '"]');
    if (row) {
      row.classList.add("sel");
      var box = document.getElementById("treebox");
      // Scroll the tree panel only, never the page (the header and chart stay in view).
      if (scroll && box && (row.offsetTop < box.scrollTop || row.offsetTop + ROW > box.scrollTop + box.clientHeight))
        box.scrollTop = Math.max(0, row.offsetTop - box.clientHeight / 2);
    }
    document.querySelectorAll("#chart-svg .pt.sel").forEach(function (p) { p.classList.remove("sel"); });
    var pt = document.querySelector('#chart-svg .pt[data-step="' + step + '"]');
    if (pt) pt.classList.add("sel");
    if (MODE === "ui") history.replaceState(null, "", "#run=" + encodeURIComponent(state.runId) + "&step=" + step);
    renderDetail();
  }

  function renderRun(v, keep) {
    var main = document.getElementById("main");
    var scroll = keep && document.getElementById("treebox") ? document.getElementById("treebox").scrollTop : null;
    state.view = v;
    document.title = (v.run.name || v.run.id) + (MODE === "ui" ? " · weco-observe" : " · weco-observe report");
    if (!keep || !v.steps.some(function (s) { return s.step === state.selected; })) state.selected = v.best ? v.best.step : (v.steps.length ? v.steps[v.steps.length - 1].step : null);
    main.textContent = "";
    header(v).forEach(function (n) { main.appendChild(n); });
    main.appendChild(chart(v));
    main.appendChild(el("div", { cls: "split" }, [tree(v), detailPanel()]));
    main.appendChild(el("footer", { text: DASHBOARD ? "weco-observe relay dashboard · read-only · updates live" :
      MODE === "ui" ? "weco-observe local UI · read-only · updates live" : "weco-observe report · generated " + (document.body.getAttribute("data-generated") || "") + " · works offline" }));
    redrawChart();
    select(state.selected, !keep);
    if (scroll != null) document.getElementById("treebox").scrollTop = scroll;
  }

  document.addEventListener("keydown", function (e) {
    if (!state.view || e.target.tagName === "SELECT") return;
    if (e.key !== "ArrowDown" && e.key !== "ArrowUp" && e.key !== "j" && e.key !== "k") return;
    var steps = state.view.steps, i = steps.findIndex(function (s) { return s.step === state.selected; });
    i += (e.key === "ArrowDown" || e.key === "j") ? 1 : -1;
    if (i >= 0 && i < steps.length) { e.preventDefault(); select(steps[i].step, true); }
  });
  var resizeTimer = null;
  window.addEventListener("resize", function () { clearTimeout(resizeTimer); resizeTimer = setTimeout(redrawChart, 100); });

  // ---- report mode: everything is embedded -------------------------------------------
  if (MODE !== "ui") {
    var data = JSON.parse(document.getElementById("data").textContent);
    state.diffs = data.diffs || {};
    state.runId = data.view.run.id;
    renderRun(data.view, false);
    return;
  }

  // ---- UI mode: runs list, live polling ---------------------------------------------
  function getJSON(url) {
    return fetch(url, { cache: "no-store" }).then(function (r) {
      if (r.status === 401) { sessionEnded(); throw new Error("the session has ended"); }
      if (!r.ok) throw new Error(r.status);
      return r.json();
    });
  }
  function hashRun() {
    var m = /run=([^&]+)/.exec(location.hash), s = /step=(\d+)/.exec(location.hash);
    return { run: m ? decodeURIComponent(m[1]) : null, step: s ? Number(s[1]) : null };
  }

  // The relay's runs carry the key that made each one (a box or a user); a local journal's have no
  // such field. So the key line and the filters appear only where the data has keys to show.
  var FILTERS = [
    { name: "key", label: "Box or user", all: "All boxes and users", of: function (r) { return r.key; } },
    { name: "metric", label: "Metric", all: "All metrics", of: function (r) { return r.metric; } },
    { name: "goal", label: "Goal", all: "Any goal", of: function (r) { return r.goal; } },
  ];
  function attributed() { return state.runs.some(function (r) { return "key" in r; }); }
  // An option's value is the JSON of what it matches, so a key named "null" and a missing key differ.
  function code(v) { return JSON.stringify(v == null ? null : v); }
  function matches(r) {
    return FILTERS.every(function (f) { var want = state.filters[f.name]; return !want || code(f.of(r)) === want; });
  }
  function renderFilters() {
    var box = document.getElementById("filters");
    if (!box) return;
    if (!attributed()) { box.textContent = ""; box.className = ""; state.filterSig = null; return; }
    var groups = FILTERS.map(function (f) {
      var counts = {}, want = state.filters[f.name];
      state.runs.forEach(function (r) { var c = code(f.of(r)); counts[c] = (counts[c] || 0) + 1; });
      if (want && !(want in counts)) counts[want] = 0;  // the chosen value stays listed, so the filter shows
      var values = Object.keys(counts).sort(function (a, b) {
        var x = JSON.parse(a), y = JSON.parse(b);
        return x === y ? 0 : x == null ? 1 : y == null ? -1 : String(x).localeCompare(String(y));
      });
      return { f: f, counts: counts, values: values };
    });
    // Rebuilt only when the choices change: rebuilding a menu the user has open would close it. Choosing
    // changes no count (they are of every run), so the menu just used keeps its focus.
    var sig = JSON.stringify([state.runs.length, groups.map(function (g) { return g.counts; })]);
    if (sig === state.filterSig) return;
    state.filterSig = sig;
    var focused = document.activeElement && box.contains(document.activeElement) ? document.activeElement.id : null;
    box.textContent = "";
    box.className = "filters";
    groups.forEach(function (g) {
      var f = g.f, id = "filter-" + f.name;
      var options = [el("option", { value: "", text: f.all + " (" + state.runs.length + ")" })].concat(g.values.map(function (v) {
        var raw = JSON.parse(v), o = el("option", { value: v, text: (raw == null ? "unknown" : String(raw)) + " (" + g.counts[v] + ")" });
        if (v === state.filters[f.name]) o.selected = true;
        return o;
      }));
      var select = el("select", { id: id, name: f.name, onchange: function () { state.filters[f.name] = this.value; renderRuns(); } }, options);
      box.appendChild(el("label", { "for": id }, [el("span", { text: f.label }), select]));
    });
    if (focused) document.getElementById(focused).focus();
  }
  function renderRuns() {
    var list = document.getElementById("runs"), keyed = attributed(), shown = state.runs.filter(matches);
    renderFilters();
    list.textContent = "";
    if (!state.runs.length) list.appendChild(el("div", { cls: "empty", text: "No runs yet." }));
    else if (!shown.length) list.appendChild(el("div", { cls: "empty", id: "no-match", text: "No run matches these filters." }));
    else if (shown.length < state.runs.length) list.appendChild(el("div", { cls: "count", id: "run-count", text: shown.length + " of " + state.runs.length + " runs" }));
    shown.forEach(function (r) {
      var best = r.best_step == null ? "no best yet" : "best " + fmt(r.best_value) + " @" + r.best_step;
      var goal = keyed ? " (" + ({ maximize: "max", minimize: "min" }[r.goal] || "?") + ")" : "";
      // On a relay, "pending" counts what it has not forwarded upstream yet, not what a box has not sent.
      var pending = r.pending ? " · " + r.pending + (keyed ? " not yet upstream" : " pending") : "";
      list.appendChild(el("a", { cls: "runlink" + (r.id === state.runId ? " active" : ""), href: "#run=" + encodeURIComponent(r.id), "data-run": r.id }, [
        el("div", { cls: "rn", text: r.name || r.id }),
        keyed ? el("div", { cls: "rm who", text: "by " + whoText(r.key) }) : null,
        el("div", { cls: "rm", text: (r.metric || "?") + goal + " · " + r.steps + (r.steps === 1 ? " step · " : " steps · ") + best }),
        el("div", { cls: "rm", text: ago(r.last_activity) + pending }),
      ]));
    });
  }
  function loadRun(id, keep) {
    return getJSON("api/runs/" + encodeURIComponent(id)).then(function (v) {
      if (state.ended) return;
      state.diffs = {};  // a re-logged step may have new code: fetch diffs again
      state.runId = id;
      renderRuns();
      renderRun(v, keep);
    });
  }
  function refresh(keep) {
    return getJSON("api/runs").then(function (runs) {
      if (state.ended) return;
      state.runs = runs;
      var want = hashRun(), first = runs.filter(matches)[0] || runs[0];
      var id = want.run && runs.some(function (r) { return r.id === want.run; }) ? want.run : (state.runId || (first && first.id));
      if (!keep && want.step != null) state.selected = want.step;
      renderRuns();
      if (id) return loadRun(id, keep || want.step != null);
      document.getElementById("main").textContent = "";
      document.getElementById("main").appendChild(el("div", { cls: "empty", text: DASHBOARD
        ? "No runs on this relay yet: point a box's WECO_BASE_URL at it and run weco observe sync."
        : "No runs in this journal yet: start one with weco observe init." }));
    });
  }
  // A revoked key or an expired session: nothing of the site stays on screen, and the way back is a key.
  function sessionEnded() {
    if (state.ended) return;
    state.ended = true;
    state.runs = [];
    state.view = null;
    ["runs", "filters", "main", "viewer"].forEach(function (id) { var n = document.getElementById(id); if (n) n.textContent = ""; });
    document.getElementById("filters").className = "";
    var live = document.getElementById("live");
    live.className = "live off";
    live.textContent = "signed out";
    var session = document.querySelector("form.session");
    if (session) session.hidden = true;
    document.title = "Key needed · weco-observe relay";
    document.getElementById("main").appendChild(el("div", { cls: "empty ended", id: "ended", role: "alert" }, [
      el("h2", { text: "This dashboard needs a key" }),
      el("p", { text: "Your session has ended: it expired, the relay restarted, or its key was revoked." }),
      el("a", { href: "./", id: "login-again", text: "Open the dashboard with a key" }),
    ]));
  }
  window.addEventListener("hashchange", function () {
    var want = hashRun();
    if (want.run && want.run !== state.runId && !state.ended) { state.selected = null; loadRun(want.run, false); }
  });
  function poll() {
    if (state.ended) return;
    getJSON("api/state").then(function (s) {
      document.getElementById("live").className = "live";
      var viewer = document.getElementById("viewer");
      if (viewer && s.viewer) viewer.textContent = "Key: " + s.viewer;
      if (state.version !== null && s.version !== state.version) { state.version = s.version; return refresh(true); }
      state.version = s.version;
    }).catch(function () { if (!state.ended) document.getElementById("live").className = "live off"; })
      .then(function () { if (!state.ended) setTimeout(poll, 1500); });
  }
  refresh(false).then(poll, poll);
})();
