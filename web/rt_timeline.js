// Run Telemetry: the small VRAM timeline of the sidebar (plain SVG, no chart library). Registers nothing.
import { fmtClock, fmtDelta, fmtMem, h, isNum, memoryTaken, shortId, svg } from "./rt_common.js";

const OUTCOME_COLOR = {
  success: "#4caf50",
  error: "#ef5350",
  crashed: "#ef5350",
  interrupted: "#ffb74d",
  cancelled: "#9e9e9e",
  lost: "#ef5350",
  running: "#64b5f6",
};

// Bands of the 0..100 view box (stretched to the panel's width): free level, delta bars, outcome strip.
const LEVEL = [3, 50];
const DELTA = [57, 89];
const STRIP = [93, 100];

const deltaOf = (p) => (isNum(p.VramDeltaMB) ? p.VramDeltaMB : p.VramAfterMB - p.VramBeforeMB);
const tone = (d) => (memoryTaken(d) ? "rt-tl-taken" : d >= 0.5 ? "rt-tl-freed" : "rt-tl-flat");

/**
 * Recent prompts, oldest on the left. Top: free VRAM before -> after each prompt (a coloured step per prompt, dashed
 * between prompts). Middle: each prompt's delta as a bar around zero (down and red = memory taken). Bottom: outcome.
 */
export function vramTimeline(promptsNewestFirst, units) {
  const points = promptsNewestFirst.filter((p) => isNum(p.VramBeforeMB) && isNum(p.VramAfterMB)).reverse();
  if (!points.length) {
    return h("div", { class: "rt-empty rt-timeline-empty" }, "No VRAM figures yet: they appear when a prompt ends.");
  }
  const values = points.flatMap((p) => [p.VramBeforeMB, p.VramAfterMB]);
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (hi - lo < 2) {
    lo -= 1;
    hi += 1;
  }
  const pad = (hi - lo) * 0.06;
  lo -= pad;
  hi += pad;
  const yLevel = (v) => LEVEL[1] - ((v - lo) / (hi - lo)) * (LEVEL[1] - LEVEL[0]);
  const maxDelta = Math.max(1, ...points.map((p) => Math.abs(deltaOf(p))));
  const zero = (DELTA[0] + DELTA[1]) / 2;
  const half = (DELTA[1] - DELTA[0]) / 2;
  const slot = 100 / points.length;

  const items = [];
  const connectors = [];
  let prev = null;
  points.forEach((p, i) => {
    const x0 = i * slot;
    const xa = x0 + slot * 0.2;
    const xb = x0 + slot * 0.8;
    const d = deltaOf(p);
    const ya = yLevel(p.VramBeforeMB);
    const yb = yLevel(p.VramAfterMB);
    if (prev) connectors.push(svg("line", { x1: prev[0], y1: prev[1], x2: xa, y2: ya, class: "rt-tl-conn" }));
    prev = [xb, yb];
    const barH = Math.max((Math.abs(d) / maxDelta) * half, 0.8);
    const title =
      `${fmtClock(p.StartedAt || p.QueuedAt)}  ${shortId(p.PromptId)}  ${p.Outcome}\n` +
      `free ${fmtMem(p.VramBeforeMB, units)} \u2192 ${fmtMem(p.VramAfterMB, units)} (${fmtDelta(d, units)})`;
    items.push(
      svg(
        "g",
        { class: "rt-tl-item", "data-prompt": p.PromptId },
        svg("title", {}, title),
        svg("rect", { x: x0, y: 0, width: slot, height: 100, class: "rt-tl-hit" }),
        svg("line", { x1: xa, y1: ya, x2: xb, y2: yb, class: `rt-tl-step ${tone(d)}` }),
        svg("rect", {
          x: x0 + slot * 0.25,
          y: d < 0 ? zero : zero - barH,
          width: slot * 0.5,
          height: barH,
          class: `rt-tl-bar ${tone(d)}`,
        }),
        svg("rect", {
          x: x0 + slot * 0.08,
          y: STRIP[0],
          width: slot * 0.84,
          height: STRIP[1] - STRIP[0],
          fill: OUTCOME_COLOR[p.Outcome] || "#9e9e9e",
          class: "rt-tl-outcome",
        }),
      ),
    );
  });
  const last = points[points.length - 1];
  return h(
    "div",
    { class: "rt-timeline", "data-count": String(points.length) },
    h(
      "div",
      { class: "rt-tl-axis" },
      h("span", { title: "Highest free memory shown" }, `free ${fmtMem(hi, units)}`),
      h(
        "span",
        { class: `rt-tl-last ${memoryTaken(deltaOf(last)) ? "rt-taken" : ""}` },
        `last ${fmtDelta(deltaOf(last), units)}`,
      ),
    ),
    svg(
      "svg",
      {
        viewBox: "0 0 100 100",
        preserveAspectRatio: "none",
        class: "rt-tl-svg",
        role: "img",
        "aria-label": `Free VRAM before and after each of the last ${points.length} prompts`,
      },
      svg("line", { x1: 0, x2: 100, y1: zero, y2: zero, class: "rt-tl-base" }),
      ...connectors,
      ...items,
    ),
    h(
      "div",
      { class: "rt-tl-axis" },
      h("span", { title: "Scale of the delta bars" }, `\u0394 \u00b1${fmtMem(maxDelta, units)}`),
      h(
        "span",
        { class: "rt-tl-legend" },
        h("i", { class: "rt-sw rt-tl-taken" }),
        "taken",
        h("i", { class: "rt-sw rt-tl-freed" }),
        "freed",
      ),
    ),
  );
}
