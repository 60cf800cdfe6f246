// Run Telemetry: helpers shared by the package's web modules. Registers nothing, so loading it alone is harmless.
//
// One live store per page: the package's websocket event ("telemetry.prompt") feeds it as soon as any module asks
// for it; the routes are only called by whoever needs fresh data (the open sidebar tab), never on a timer here.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

export { app, api };

export const EVENT = "telemetry.prompt";
export const FINAL_OUTCOMES = new Set(["success", "error", "interrupted", "crashed", "cancelled", "lost"]);
const KEPT_PROMPTS = 500;

// --- settings -------------------------------------------------------------------------------------------------------

export const SETTING = {
  promptsShown: "RunTelemetry.Sidebar.PromptsShown",
  units: "RunTelemetry.Sidebar.Units",
  toasts: "RunTelemetry.Notifications.Toasts",
  nodeBadges: "RunTelemetry.Nodes.Badges",
};

const DEFAULTS = {
  [SETTING.promptsShown]: 20,
  [SETTING.units]: "MiB",
  [SETTING.toasts]: true,
  [SETTING.nodeBadges]: true,
};

/** A setting's value, or its default when the settings API or the setting (module not loaded) is missing. */
export function setting(id) {
  try {
    const value = app.extensionManager?.setting?.get?.(id);
    if (value !== undefined && value !== null) return value;
  } catch {
    // older frontends: fall through to the legacy settings object
  }
  try {
    const value = app.ui?.settings?.getSettingValue?.(id);
    if (value !== undefined && value !== null) return value;
  } catch {
    // no settings at all: defaults
  }
  return DEFAULTS[id];
}

export function promptsShown() {
  const n = Number(setting(SETTING.promptsShown));
  return Number.isFinite(n) && n >= 1 ? Math.min(Math.round(n), 200) : DEFAULTS[SETTING.promptsShown];
}

// --- formatting -----------------------------------------------------------------------------------------------------

const MINUS = "\u2212";
const nf0 = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const nf1 = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1, minimumFractionDigits: 1 });
const nf2 = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2, minimumFractionDigits: 2 });

export const isNum = (v) => typeof v === "number" && Number.isFinite(v);

/** Seconds for people: 0.42 s, 3.2 s, 2m 05s, 1h 02m. */
export function fmtSeconds(s) {
  if (!isNum(s)) return "\u2013";
  if (s < 10) return `${nf2.format(s)} s`;
  if (s < 60) return `${nf1.format(s)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(Math.round(s - m * 60)).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

/** MiB in the unit the user picked (MiB or GiB). */
export function fmtMem(mib, units = setting(SETTING.units)) {
  if (!isNum(mib)) return "\u2013";
  if (units === "GiB") return `${nf2.format(mib / 1024)} GiB`;
  return `${Math.abs(mib) >= 100 ? nf0.format(mib) : nf1.format(mib)} MiB`;
}

/** A signed MiB delta (true minus sign) in the user's unit. */
export function fmtDelta(mib, units = setting(SETTING.units)) {
  if (!isNum(mib)) return "\u2013";
  const text = fmtMem(Math.abs(mib), units);
  if (Math.abs(mib) < 0.005) return `\u00b10 ${units === "GiB" ? "GiB" : "MiB"}`;
  return `${mib < 0 ? MINUS : "+"}${text}`;
}

export const bytesToMiB = (b) => (isNum(b) ? b / 1048576 : null);

/** Local wall-clock time of an ISO timestamp (HH:MM:SS), or "". */
export function fmtClock(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? "" : d.toLocaleTimeString([], { hour12: false });
}

/** Relative age of an epoch-seconds or ISO time: "12 s ago", "5 min ago". */
export function fmtAgo(t) {
  const ms = typeof t === "number" ? t * 1000 : Date.parse(t);
  if (!Number.isFinite(ms)) return "";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

/** "RTTestRaise #11: boom" for a prompt's Error (or ``fallback`` when there is none). */
export function errorText(err, fallback = "") {
  if (!err) return fallback;
  const where = `${err.NodeType || err.ExceptionType || "node"}${err.NodeId ? ` #${err.NodeId}` : ""}`;
  return `${where}: ${err.Message || fallback}`;
}

/** "1 frame", "3 frames"; ``many`` for irregular plurals. */
export const plural = (n, one, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;

export const shortId = (id) => (id && id.length > 12 ? `${id.slice(0, 8)}\u2026` : id || "");

/** Memory was taken when free VRAM went down (the contract's delta is after minus before, of free memory). */
export const memoryTaken = (deltaMiB) => isNum(deltaMiB) && deltaMiB <= -0.5;

// --- markers --------------------------------------------------------------------------------------------------------

/** Problem markers of a summary: a .failed left behind ("failed") or a marker that could not be written ("error"). */
export function problemMarkers(summary) {
  return (summary?.Markers || []).filter((m) => m.State === "failed" || m.State === "error");
}

export const MARKER_MARK = {
  written: "\u2713",
  failed: "\u2717",
  error: "\u2717",
  pending: "\u2026",
  skipped: "\u21bb",
};

export const MARKER_LABEL = {
  written: ".done written",
  failed: ".failed written",
  error: "not written",
  pending: "pending",
  skipped: "skipped (retried)",
};

// --- DOM ------------------------------------------------------------------------------------------------------------

/** Build an element: h("div", {class: "x", onclick: fn, dataset: {a: 1}}, "text", child…). Text is never parsed. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : String(c));
  }
}

const SVG_NS = "http://www.w3.org/2000/svg";

/** Build an SVG element (attributes set verbatim, children as for h). */
export function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

/** Add the package's stylesheet once (a <link> next to this module). */
export function ensureStyles() {
  const id = "run-telemetry-css";
  if (document.getElementById(id)) return;
  const link = document.createElement("link");
  link.id = id;
  link.rel = "stylesheet";
  link.href = new URL("./run_telemetry.css", import.meta.url).href;
  document.head.append(link);
}

// --- server calls ---------------------------------------------------------------------------------------------------

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** JSON from a package route through api.fetchApi; throws HttpError (with the server's "error" text) otherwise. */
export async function getJson(route, options) {
  const res = await api.fetchApi(route, options);
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  if (!res.ok) throw new HttpError(res.status, body?.error || `${res.status} ${res.statusText || ""}`.trim());
  return body;
}

/** Absolute URL of a route for a link (api.apiURL when the frontend has it). */
export function routeUrl(route) {
  if (typeof api.apiURL === "function") return api.apiURL(route);
  return `${location.pathname.replace(/\/[^/]*$/, "")}/api${route}`;
}

// --- live store -----------------------------------------------------------------------------------------------------

const listeners = new Set();
const promptHooks = new Set();
let live = false;

export const store = {
  prompts: new Map(), // PromptId -> summary (events and GET /telemetry merged)
  snapshot: null,
  notes: [],
  policy: null,
  webhooks: null, // GET /telemetry's Webhooks summary: counts and the endpoints now failing
  storeHealth: null, // GET /telemetry's Store: {Ok, Mode, Path, Problem, Since, KeptFile}
  health: null, // GET /telemetry's Health: {Status, Failing: [{Name, Status, Detail, Since}], CheckedAt}
  version: null,
  statusError: null,
  runs: null, // list from GET /telemetry/runs, null until fetched
  runsAvailable: null, // false when the route answers 404 (older server): the UI hides the runs section
  runsError: null,
  runDetails: new Map(), // RunId -> {meta, error, loading}
  finalizeResults: new Map(), // RunId -> finalize response or {error}
};

/** Call fn(kind, detail) on every change of the store; returns the unsubscribe function. */
export function subscribe(fn) {
  startLive();
  listeners.add(fn);
  return () => listeners.delete(fn);
}

/** Call fn(summary) for every telemetry.prompt event (after the store has taken it). */
export function onPromptEvent(fn) {
  startLive();
  promptHooks.add(fn);
  return () => promptHooks.delete(fn);
}

export function notify(kind, detail) {
  for (const fn of [...listeners]) {
    try {
      fn(kind, detail);
    } catch (err) {
      console.error("[Run Telemetry] listener failed", err);
    }
  }
}

function upsert(summary) {
  if (!summary?.PromptId) return;
  const prev = store.prompts.get(summary.PromptId);
  // A late "running" copy must not replace a final one.
  if (prev && FINAL_OUTCOMES.has(prev.Outcome) && !FINAL_OUTCOMES.has(summary.Outcome)) return;
  store.prompts.set(summary.PromptId, { ...prev, ...summary, _seenAt: prev?._seenAt ?? Date.now() });
  if (store.prompts.size > KEPT_PROMPTS) {
    const oldest = sortedPrompts().slice(KEPT_PROMPTS);
    for (const p of oldest) store.prompts.delete(p.PromptId);
  }
}

function sortKey(p) {
  const t = Date.parse(p.QueuedAt || p.StartedAt || p.EndedAt || "");
  return Number.isFinite(t) ? t : p._seenAt || 0;
}

/** Every known prompt, newest first. */
export function sortedPrompts() {
  return [...store.prompts.values()].sort((a, b) => sortKey(b) - sortKey(a));
}

/** Attach the websocket listener once per page. */
export function startLive() {
  if (live) return;
  live = true;
  api.addEventListener(EVENT, (event) => {
    const summary = event?.detail;
    if (!summary || typeof summary !== "object") return;
    upsert(summary);
    notify("prompt", summary);
    for (const fn of [...promptHooks]) {
      try {
        fn(summary);
      } catch (err) {
        console.error("[Run Telemetry] prompt hook failed", err);
      }
    }
  });
  api.addEventListener("reconnected", () => notify("reconnected"));
}

/** GET /telemetry: device snapshot, notes, policy and the recent prompts. */
export async function refreshStatus(limit = promptsShown()) {
  try {
    const body = await getJson(`/telemetry?limit=${encodeURIComponent(limit)}`);
    store.snapshot = body?.Snapshot ?? null;
    store.notes = Array.isArray(body?.FallbackNotes) ? body.FallbackNotes : [];
    store.policy = body?.Policy ?? null;
    store.storeHealth = body?.Store ?? null;
    store.health = body?.Health ?? null;
    store.version = body?.Version ?? null;
    store.webhooks = body?.Webhooks ?? null;
    store.statusError = null;
    for (const p of body?.Prompts || []) upsert(p);
  } catch (err) {
    store.statusError = err.message || String(err);
  }
  notify("status");
}

/** GET /telemetry/runs; a 404 (server without runs) marks the section unavailable. */
export async function refreshRuns() {
  try {
    const body = await getJson("/telemetry/runs");
    store.runs = Array.isArray(body?.Runs) ? body.Runs : [];
    store.runsAvailable = true;
    store.runsError = null;
  } catch (err) {
    if (err.status === 404) store.runsAvailable = false;
    else store.runsError = err.message || String(err);
  }
  notify("runs");
}

/** GET /telemetry/runs/{id}: the run's artifact metadata as assembled now. */
export async function refreshRun(runId) {
  const cur = store.runDetails.get(runId) || {};
  store.runDetails.set(runId, { ...cur, loading: true });
  notify("run", runId);
  try {
    const meta = await getJson(`/telemetry/runs/${encodeURIComponent(runId)}`);
    store.runDetails.set(runId, { meta, error: null, loading: false });
  } catch (err) {
    store.runDetails.set(runId, { ...cur, error: err.message || String(err), loading: false });
  }
  notify("run", runId);
}

/** POST /telemetry/runs/{id}/finalize, then refresh the run list (its Finalized flag). */
export async function finalizeRun(runId) {
  store.finalizeResults.set(runId, { pending: true });
  notify("run", runId);
  try {
    const result = await getJson(`/telemetry/runs/${encodeURIComponent(runId)}/finalize`, { method: "POST" });
    store.finalizeResults.set(runId, result);
  } catch (err) {
    store.finalizeResults.set(runId, { error: err.message || String(err) });
  }
  notify("run", runId);
  await refreshRuns();
}

/** A display setting changed: open views re-render. */
export function repaintSettings() {
  notify("settings");
}
