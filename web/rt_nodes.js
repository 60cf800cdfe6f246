// Run Telemetry: badges on the nodes after a prompt queued from this editor.
// Telemetry Capture shows its span (seconds, VRAM delta); Write Done Marker shows what became of its marker.
//
// Only prompts this page queued count (ComfyUI sends execution_* messages to the queuing client only): a batch
// pipeline's prompt with the same node ids must not paint over the workflow being edited.
import {
  api,
  app,
  fmtDelta,
  fmtSeconds,
  isNum,
  MARKER_LABEL,
  MARKER_MARK,
  memoryTaken,
  onPromptEvent,
  setting,
  SETTING,
} from "./rt_common.js";

const CAPTURE = "TelemetryCapture";
const MARKER = "WriteDoneMarker";
const OWN_KEPT = 200;

const ownPrompts = new Set();

const COLORS = {
  ok: { fgColor: "#e8f5e9", bgColor: "#2e7d32" },
  bad: { fgColor: "#ffebee", bgColor: "#c62828" },
  warn: { fgColor: "#1b1b1b", bgColor: "#ffb300" },
  info: { fgColor: "#e3f2fd", bgColor: "#1565c0" },
  idle: { fgColor: "#eeeeee", bgColor: "#555555" },
};

function noteOwn(event) {
  const id = event?.detail?.prompt_id;
  if (!id || ownPrompts.has(id)) return;
  ownPrompts.add(id);
  if (ownPrompts.size > OWN_KEPT) ownPrompts.delete(ownPrompts.values().next().value);
}

function classOf(node) {
  return node?.comfyClass || node?.type;
}

/** Set (or clear, with null) a node's badge and repaint the canvas. */
function setBadge(node, state) {
  node.__rtBadge = state ? { ...state, key: `${state.text}|${state.tone}` } : null;
  node.__rtBadgeObj = null;
  app.graph?.setDirtyCanvas?.(true, true);
}

function makeBadge(node) {
  const state = node.__rtBadge;
  if (!state || setting(SETTING.nodeBadges) === false) return null;
  const Badge = globalThis.LGraphBadge;
  if (node.__rtBadgeObj?.key !== state.key) {
    node.__rtBadgeObj = {
      key: state.key,
      badge: new Badge({ text: state.text, ...(COLORS[state.tone] || COLORS.idle), fontSize: 12, height: 20 }),
    };
  }
  return node.__rtBadgeObj.badge;
}

const emptyBadge = () => (globalThis.LGraphBadge ? new globalThis.LGraphBadge({ text: "" }) : null);

/** Attach the badge to a node of ours: through node.badges where the frontend has them, else drawn by hand. */
function attach(node) {
  if (node.__rtAttached) return;
  node.__rtAttached = true;
  if (Array.isArray(node.badges) && typeof globalThis.LGraphBadge === "function") {
    node.__rtBadgeFn = () => makeBadge(node) || emptyBadge();
    node.badges.push(node.__rtBadgeFn);
    return;
  }
  const prev = node.onDrawForeground;
  node.onDrawForeground = function (ctx, ...rest) {
    const r = prev?.apply(this, [ctx, ...rest]);
    const state = this.__rtBadge;
    if (state && setting(SETTING.nodeBadges) !== false) drawFallback(ctx, this, state);
    return r;
  };
}

function drawFallback(ctx, node, state) {
  const colors = COLORS[state.tone] || COLORS.idle;
  const titleH = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  ctx.save();
  ctx.font = "12px sans-serif";
  const w = ctx.measureText(state.text).width + 12;
  const x = node.size[0] - w;
  const y = -titleH - 24;
  ctx.fillStyle = colors.bgColor;
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x, y, w, 20, 5);
  else ctx.rect(x, y, w, 20);
  ctx.fill();
  ctx.fillStyle = colors.fgColor;
  ctx.textBaseline = "middle";
  ctx.fillText(state.text, x + 6, y + 11);
  ctx.restore();
}

function nodeById(id) {
  try {
    return app.graph?.getNodeById?.(isNaN(+id) ? id : +id) ?? app.graph?.getNodeById?.(id) ?? null;
  } catch {
    return null;
  }
}

function spanBadge(span) {
  const parts = [`${span.Label || "span"} ${fmtSeconds(span.Seconds)}`];
  if (isNum(span.VramDeltaMB)) parts.push(`VRAM ${fmtDelta(span.VramDeltaMB)}`);
  return { text: parts.join(" \u00b7 "), tone: memoryTaken(span.VramDeltaMB) ? "warn" : "ok" };
}

function markerBadge(m) {
  const tone = { written: "ok", failed: "bad", error: "bad", pending: "info", skipped: "idle" }[m.State] || "idle";
  const mark = MARKER_MARK[m.State] || "\u2026";
  return { text: `${mark} marker ${MARKER_LABEL[m.State] || m.State}`, tone };
}

function onPrompt(summary) {
  if (!ownPrompts.has(summary.PromptId)) return;
  for (const span of summary.Spans || []) {
    const node = nodeById(span.NodeId);
    if (classOf(node) === CAPTURE) setBadge(node, spanBadge(span));
  }
  for (const m of summary.Markers || []) {
    const node = nodeById(m.NodeId);
    if (classOf(node) === MARKER) setBadge(node, markerBadge(m));
  }
}

app.registerExtension({
  name: "RunTelemetry.NodeBadges",
  setup() {
    for (const type of ["execution_start", "execution_cached", "executed", "execution_success", "execution_error"]) {
      api.addEventListener(type, noteOwn);
    }
    onPromptEvent(onPrompt);
  },
  nodeCreated(node) {
    const cls = classOf(node);
    if (cls === CAPTURE || cls === MARKER) attach(node);
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== MARKER) return;
    const prev = nodeType.prototype.onExecuted;
    // The node's own UI output arrives while the prompt still runs: the marker is declared, not yet written.
    nodeType.prototype.onExecuted = function (output) {
      const r = prev?.apply(this, arguments);
      if (output?.run_telemetry_marker) setBadge(this, { text: "\u2026 marker pending", tone: "info" });
      return r;
    };
  },
});
