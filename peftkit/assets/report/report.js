// report.html's charts: SVG line charts drawn from the JSON embedded in the page (no network).
// Each chart: hover for values, click a legend entry to hide or show its curve. After drawing, every
// curve's <g> carries data-points (the points it drew) and <body> carries data-rendered.
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var PALETTE = [];  // from the page's data
  var M = { l: 64, r: 64, t: 14, b: 40 };

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }

  function niceTicks(lo, hi, n) {
    if (!isFinite(lo) || !isFinite(hi)) return [];
    if (hi === lo) { hi = lo + 1; lo = lo - 1; }
    var raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 2.5, 5, 10].map(function (m) { return m * mag; })
      .filter(function (s) { return s >= raw; })[0];
    var ticks = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(v);
    return ticks;
  }

  function fmt(v) {
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (a >= 1e5 || a < 1e-3) return v.toExponential(2);
    if (a >= 100) return v.toFixed(0);
    return String(+v.toPrecision(4));
  }

  function extent(series, axis, key) {
    var lo = Infinity, hi = -Infinity;
    series.forEach(function (s) {
      if (s.hidden || (axis && (s.axis || "y") !== axis)) return;
      s.points.forEach(function (p) { lo = Math.min(lo, p[key]); hi = Math.max(hi, p[key]); });
    });
    if (lo === hi) { lo -= Math.abs(lo) * 0.05 || 1; hi += Math.abs(hi) * 0.05 || 1; }
    var pad = (hi - lo) * 0.05;
    return key === 0 ? [lo, hi] : [lo - pad, hi + pad];
  }

  function draw(box, spec) {
    var svg = box.querySelector("svg");
    if (svg) svg.remove();
    // drawn at the box's own width, so the text keeps its size in narrow and wide charts
    var W = Math.max(320, Math.round(box.getBoundingClientRect().width) || 760);
    var H = W > 700 ? 300 : 240;
    svg = el("svg", { viewBox: "0 0 " + W + " " + H, class: "chart" });
    box.insertBefore(svg, box.firstChild);
    var shown = spec.series.filter(function (s) { return !s.hidden && s.points.length; });
    var x = extent(shown, null, 0);
    var y = spec.range || extent(shown, "y", 1), y2 = extent(shown, "y2", 1);
    var pw = W - M.l - M.r, ph = H - M.t - M.b;
    function sx(v) { return M.l + (v - x[0]) / ((x[1] - x[0]) || 1) * pw; }
    function sy(v, axis) {
      var r = axis === "y2" ? y2 : y;
      return M.t + ph - (v - r[0]) / ((r[1] - r[0]) || 1) * ph;
    }
    var grid = el("g", { class: "grid" }, svg);
    niceTicks(x[0], x[1], 8).forEach(function (t) {
      el("line", { x1: sx(t), x2: sx(t), y1: M.t, y2: M.t + ph }, grid);
      el("text", { x: sx(t), y: M.t + ph + 16, "text-anchor": "middle" }, grid).textContent = fmt(t);
    });
    niceTicks(y[0], y[1], 6).forEach(function (t) {
      el("line", { x1: M.l, x2: M.l + pw, y1: sy(t), y2: sy(t) }, grid);
      el("text", { x: M.l - 6, y: sy(t) + 4, "text-anchor": "end" }, grid).textContent = fmt(t);
    });
    var hasY2 = shown.some(function (s) { return s.axis === "y2"; });
    if (hasY2) {
      niceTicks(y2[0], y2[1], 6).forEach(function (t) {
        el("text", { x: M.l + pw + 6, y: sy(t, "y2") + 4, class: "y2" }, grid).textContent = fmt(t);
      });
    }
    el("rect", { x: M.l, y: M.t, width: pw, height: ph, class: "frame" }, svg);
    el("text", { x: M.l + pw / 2, y: H - 4, "text-anchor": "middle", class: "label" }, svg)
      .textContent = spec.x;
    el("text", { transform: "translate(14," + (M.t + ph / 2) + ") rotate(-90)",
      "text-anchor": "middle", class: "label" }, svg).textContent = spec.y;
    if (hasY2) {
      el("text", { transform: "translate(" + (W - 10) + "," + (M.t + ph / 2) + ") rotate(90)",
        "text-anchor": "middle", class: "label y2" }, svg).textContent = spec.y2;
    }
    spec.series.forEach(function (s) {
      var g = el("g", { class: "series", "data-series": s.name, "data-points": 0 }, svg);
      if (s.hidden) return;
      var d = s.points.map(function (p, i) {
        return (i ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1], s.axis).toFixed(1);
      }).join("");
      el("path", { d: d, stroke: s.color, class: "curve " + (s.style || "line") }, g);
      if (s.style === "markers" || s.points.length === 1) {
        s.points.forEach(function (p) {
          el("circle", { cx: sx(p[0]), cy: sy(p[1], s.axis), r: 3, fill: s.color }, g);
        });
      }
      g.setAttribute("data-points", s.points.length);
    });
    var cursor = el("line", { y1: M.t, y2: M.t + ph, class: "cursor", visibility: "hidden" }, svg);
    var tip = box.querySelector(".tip");
    svg.addEventListener("mousemove", function (ev) {
      var r = svg.getBoundingClientRect();
      var vx = x[0] + ((ev.clientX - r.left) * W / r.width - M.l) / pw * (x[1] - x[0]);
      var best = null;
      shown.forEach(function (s) {
        s.points.forEach(function (p) {
          if (best === null || Math.abs(p[0] - vx) < Math.abs(best - vx)) best = p[0];
        });
      });
      if (best === null) return;
      cursor.setAttribute("x1", sx(best));
      cursor.setAttribute("x2", sx(best));
      cursor.setAttribute("visibility", "visible");
      var lines = [spec.x + " " + fmt(best)];
      shown.forEach(function (s) {
        s.points.forEach(function (p) {
          if (p[0] === best) lines.push(s.name + ": " + fmt(p[1]));
        });
      });
      tip.textContent = lines.join("\n");
      tip.style.visibility = "visible";
    });
    svg.addEventListener("mouseleave", function () {
      cursor.setAttribute("visibility", "hidden");
      tip.style.visibility = "hidden";
    });
  }

  function chart(parent, spec, wide) {
    var wrap = document.createElement("div");
    wrap.className = wide ? "chartwrap wide" : "chartwrap";
    var box = document.createElement("div");
    box.className = "chartbox";
    box.id = "chart-" + spec.id;
    var h = document.createElement("h3");
    h.textContent = spec.title;
    wrap.appendChild(h);
    wrap.appendChild(box);
    parent.appendChild(wrap);
    var tip = document.createElement("pre");
    tip.className = "tip";
    box.appendChild(tip);
    var legend = document.createElement("div");
    legend.className = "legend";
    box.appendChild(legend);
    var used = spec.series.map(function (s) { return s.color; });
    var free = PALETTE.filter(function (c) { return used.indexOf(c) < 0; });
    spec.series.forEach(function (s, i) {
      s.color = s.color || free[i % free.length];
      var item = document.createElement("button");
      item.type = "button";
      item.innerHTML = "<span class='swatch'></span>";
      item.querySelector(".swatch").style.background = s.color;
      item.appendChild(document.createTextNode(s.name));
      item.addEventListener("click", function () {
        s.hidden = !s.hidden;
        item.classList.toggle("off", !!s.hidden);
        draw(box, spec);
      });
      legend.appendChild(item);
    });
    draw(box, spec);
  }

  function main() {
    var data = JSON.parse(document.getElementById("report-data").textContent);
    PALETTE = data.palette;
    var parent = document.getElementById("charts");
    data.charts.forEach(function (spec, i) { chart(parent, spec, i < data.wide); });
    document.body.setAttribute("data-rendered", String(data.charts.length));
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", main);
  else main();
})();
