// A stacked bar chart in SVG, drawn at the width of its container (and
// again when that changes). Colours come from the stylesheet (.c0 … .c7).
// Hovering a bar (or focusing the figure and reading its label) gives the
// numbers; the page shows the same numbers in a table.

import { h, svg } from "./dom.js";

function niceCeiling(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

/**
 * buckets: [{key, label}]; series: [{name, values: [number|null per bucket]}];
 * format: number → text.
 */
export function barChart({ label, buckets, series, format, height = 180 }) {
  const plot = h("div", { class: "chart-plot" });
  const totals = buckets.map((_, i) => series.reduce((sum, s) => sum + (Number(s.values[i]) || 0), 0));
  const grand = totals.reduce((a, b) => a + b, 0);
  const figure = h(
    "figure",
    { class: "chart" },
    h("figcaption", {}, h("span", { class: "chart-title" }, label), " ", h("span", { class: "chart-total" }, format(grand))),
    plot,
    h(
      "ul",
      { class: "legend" },
      series.map((s, i) => h("li", {}, h("span", { class: `swatch c${i % 8}`, "aria-hidden": "true" }), s.name)),
    ),
  );
  plot.setAttribute("role", "img");
  plot.setAttribute(
    "aria-label",
    `${label}: ${format(grand)} in total over ${buckets.length} periods; ` +
      series.map((s) => `${s.name} ${format(s.values.reduce((a, b) => a + (Number(b) || 0), 0))}`).join(", "),
  );

  let drawnWidth = 0;
  function draw() {
    const width = Math.floor(plot.clientWidth);
    if (!width || width === drawnWidth) return;
    drawnWidth = width;
    const pad = { left: 52, right: 6, top: 8, bottom: 22 };
    const w = Math.max(width - pad.left - pad.right, 10);
    const hgt = height - pad.top - pad.bottom;
    const top = niceCeiling(Math.max(...totals, 0));
    const y = (v) => pad.top + hgt - (v / top) * hgt;
    const slot = w / Math.max(buckets.length, 1);
    const gap = slot > 6 ? slot * 0.2 : 0;
    const children = [];
    for (const tick of [0, top / 2, top]) {
      children.push(
        svg("line", { class: "grid", x1: pad.left, x2: pad.left + w, y1: y(tick), y2: y(tick) }),
        svg("text", { class: "axis", x: pad.left - 6, y: y(tick) + 4, "text-anchor": "end" }, format(tick)),
      );
    }
    buckets.forEach((bucket, i) => {
      const x = pad.left + i * slot + gap / 2;
      let base = 0;
      const rects = [];
      series.forEach((s, k) => {
        const v = Number(s.values[i]) || 0;
        if (v <= 0) return;
        rects.push(
          svg("rect", {
            class: `c${k % 8}`,
            x: x.toFixed(2),
            width: Math.max(slot - gap, 0.6).toFixed(2),
            y: y(base + v).toFixed(2),
            height: Math.max(y(base) - y(base + v), 0.5).toFixed(2),
          }),
        );
        base += v;
      });
      const tip = `${bucket.label}: ${series.map((s) => `${s.name} ${format(Number(s.values[i]) || 0)}`).join(", ")}`;
      children.push(
        svg(
          "g",
          {},
          svg("title", {}, tip),
          svg("rect", { class: "hit", x: pad.left + i * slot, y: pad.top, width: slot.toFixed(2), height: hgt }),
          rects,
        ),
      );
    });
    const labels = Math.min(buckets.length, Math.max(Math.floor(w / 90), 2));
    for (let j = 0; j < labels; j += 1) {
      const i = labels === 1 ? 0 : Math.round((j * (buckets.length - 1)) / (labels - 1));
      const anchor = j === 0 ? "start" : j === labels - 1 ? "end" : "middle";
      const x = pad.left + i * slot + (anchor === "start" ? 0 : anchor === "end" ? slot : slot / 2);
      children.push(svg("text", { class: "axis", x, y: height - 6, "text-anchor": anchor }, buckets[i].short));
    }
    plot.replaceChildren(svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, "aria-hidden": "true" }, children));
  }
  new ResizeObserver(draw).observe(plot);
  return figure;
}
