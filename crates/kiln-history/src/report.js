"use strict";
window.addEventListener("error", function (e) {
  document.body.dataset.rendered = "error";
  var box = document.getElementById("script-error");
  if (box) { box.hidden = false; box.textContent = "report script error: " + e.message; }
});
(function () {
  var DATA = JSON.parse(document.getElementById("build-data").textContent);
  var ROW = 20, PAD = 4, AXIS = 22, CACHED_W = 58, CHAR_W = 6.3;
  var NS = "http://www.w3.org/2000/svg";
  var chart = document.getElementById("chart");
  var names = document.getElementById("lane-names");
  var scale = 0; // pixels per millisecond

  function el(tag, attrs, parent) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function fmt(ms) {
    if (ms < 1000) return Math.round(ms) + "ms";
    if (ms < 60000) return (ms / 1000).toFixed(ms < 10000 ? 1 : 0) + "s";
    var s = Math.round(ms / 1000);
    return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  }
  function niceStep(ms) {
    var steps = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 15000, 30000,
      60000, 120000, 300000, 600000, 1200000, 1800000, 3600000];
    for (var i = 0; i < steps.length; i++) if (steps[i] >= ms) return steps[i];
    return steps[steps.length - 1];
  }
  // Packs bars into rows so that none overlap at the current zoom. Cached bars (instants) that
  // overlap are merged into one "CACHED ×N" group so a big cache hit stays one row.
  function layout(lane) {
    var rows = [], items = [];
    var cached = lane.bars.filter(function (b) { return b.c === "cached"; });
    var others = lane.bars.filter(function (b) { return b.c !== "cached"; });
    var groups = [];
    cached.forEach(function (b) {
      var x = b.e * scale;
      var g = groups[groups.length - 1];
      if (g && x < g.x + g.w + 2) { g.bars.push(b); g.w = Math.max(g.w, CACHED_W + 6 * String(g.bars.length).length); }
      else { groups.push({ x: x, w: CACHED_W, bars: [b] }); }
    });
    if (groups.length) rows.push({ end: Infinity, cached: true });
    groups.forEach(function (g) {
      var n = g.bars.length;
      var title = (n > 1 ? n + " cached steps\n" : "") + g.bars.slice(0, 40).map(function (b) { return b.t; }).join("\n\n") +
        (n > 40 ? "\n\n… and " + (n - 40) + " more" : "");
      var label = n > 1 ? "CACHED ×" + n : "CACHED";
      items.push({ row: 0, x: g.x, w: Math.max(g.w, label.length * 7.2 + 12), c: "cached", l: label, t: title, dark: true });
    });
    others.forEach(function (b) {
      var x = b.s * scale, w = Math.max((b.e - b.s) * scale, 2);
      var r = 0;
      for (; r < rows.length; r++) if (!rows[r].cached && rows[r].end <= x + 1) break;
      if (r === rows.length) rows.push({ end: 0 });
      rows[r].end = x + w;
      items.push({ row: r, x: x, w: w, c: b.c, l: b.l, t: b.t, wait: b.w == null ? null : b.w * scale });
    });
    return { rows: Math.max(rows.length, 1), items: items };
  }
  function render() {
    var total = DATA.total;
    var avail = Math.max(chart.clientWidth - 16, 300);
    if (!scale) scale = (avail - CACHED_W - 44) / total;
    var width = Math.max(Math.ceil(total * scale) + CACHED_W + 40, avail);
    var laid = DATA.lanes.map(layout);
    var height = AXIS + laid.reduce(function (h, l) { return h + l.rows * ROW + 2 * PAD; }, 0);
    chart.textContent = "";
    names.textContent = "";
    var svg = el("svg", { width: width, height: height, id: "timeline-svg", role: "img",
      "aria-label": "build timeline" }, chart);
    var defs = el("defs", {}, svg);
    var pat = el("pattern", { id: "hatch", width: 6, height: 6, patternUnits: "userSpaceOnUse",
      patternTransform: "rotate(45)" }, defs);
    el("rect", { width: 6, height: 6, fill: "#eef0f3" }, pat);
    el("rect", { width: 3, height: 6, fill: "#c9ced6" }, pat);
    var axisName = document.createElement("div");
    axisName.className = "axis"; axisName.style.height = AXIS + "px"; axisName.textContent = "time";
    names.appendChild(axisName);
    var step = niceStep(90 / scale);
    for (var t = 0; t <= total + step; t += step) {
      var x = t * scale;
      el("line", { x1: x, x2: x, y1: AXIS - 4, y2: height, "class": "tick" }, svg);
      el("text", { x: x + 3, y: 14, "class": "tick-label" }, svg).textContent = fmt(t);
    }
    var y = AXIS, labels = [];
    DATA.lanes.forEach(function (lane, i) {
      var L = laid[i], h = L.rows * ROW + 2 * PAD;
      var g = el("g", { "class": "lane " + lane.kind + "-lane", "data-lane": lane.name }, svg);
      el("rect", { x: 0, y: y, width: width, height: h, "class": "lane-bg" + (i % 2 ? " odd" : "") }, g);
      el("line", { x1: 0, x2: width, y1: y + h, y2: y + h, "class": "lane-sep" }, g);
      var nm = document.createElement("div");
      nm.style.height = h + "px"; nm.style.lineHeight = h + "px";
      nm.className = lane.kind === "span" ? "span-lane" : "stage-lane";
      nm.textContent = lane.name; nm.title = lane.name;
      names.appendChild(nm);
      L.items.forEach(function (it) {
        var by = y + PAD + it.row * ROW + 2, bh = ROW - 4;
        if (it.wait != null && it.wait < it.x) {
          el("line", { x1: it.wait, x2: it.x, y1: by + bh / 2, y2: by + bh / 2, "class": "wait" }, g);
        }
        var r = el("rect", { x: it.x, y: by, width: it.w, height: bh, "class": "bar " + it.c }, g);
        el("title", {}, r).textContent = it.t;
        var text = null;
        if (it.w >= it.l.length * CHAR_W + 8) text = it.l;
        else if (it.w >= 40) text = it.l.slice(0, Math.floor((it.w - 8) / CHAR_W) - 1) + "…";
        if (text) {
          var lab = el("text", { x: it.x + 4, y: by + bh - 4, "data-room": it.w - 4,
            "class": "label" + (it.dark ? " dark" : "") }, g);
          lab.textContent = text;
          labels.push(lab);
        }
      });
      y += h;
    });
    // Labels are placed by an estimate of their width; measure them, shorten the ones that do
    // not fit their bar, drop those that cannot, then count any still wider (must stay 0).
    var overflow = 0;
    labels.forEach(function (t) {
      var room = Number(t.getAttribute("data-room")), full = t.textContent;
      for (var i = 0; i < 4 && t.getComputedTextLength() > room; i++) {
        var n = Math.floor(full.length * room / t.getComputedTextLength()) - 2;
        if (n < 3) { t.remove(); return; }
        full = full.slice(0, n);
        t.textContent = full + "…";
      }
      if (t.getComputedTextLength() > room + 0.5) overflow++;
    });
    document.body.dataset.labelOverflow = String(overflow);
  }
  function zoom(f, anchor) {
    var before = chart.scrollLeft + (anchor || 0);
    var ms = before / scale;
    scale *= f;
    render();
    chart.scrollLeft = ms * scale - (anchor || 0);
  }
  document.getElementById("zoom-in").onclick = function () { zoom(2); };
  document.getElementById("zoom-out").onclick = function () { zoom(0.5); };
  document.getElementById("zoom-fit").onclick = function () { scale = 0; render(); };
  chart.addEventListener("wheel", function (e) {
    if (!e.ctrlKey) return;
    e.preventDefault();
    zoom(e.deltaY < 0 ? 1.25 : 0.8, e.clientX - chart.getBoundingClientRect().left);
  }, { passive: false });
  render();
  document.body.dataset.rendered = "ok";
})();
