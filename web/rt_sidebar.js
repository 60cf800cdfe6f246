// Run Telemetry: the "Telemetry" sidebar tab (device now, recent prompts, VRAM timeline, runs).
//
// Fetches only while the tab is open: once when it opens, after a prompt event, and a device refresh every
// DEVICE_REFRESH_MS while the page is visible. Closed, it costs one websocket listener and no request.
import {
  app,
  bytesToMiB,
  errorText,
  ensureStyles,
  finalizeRun,
  FINAL_OUTCOMES,
  fmtAgo,
  fmtClock,
  fmtDelta,
  fmtMem,
  fmtSeconds,
  h,
  isNum,
  MARKER_LABEL,
  MARKER_MARK,
  plural,
  memoryTaken,
  promptsShown,
  refreshRun,
  refreshRuns,
  refreshStatus,
  routeUrl,
  setting,
  SETTING,
  sortedPrompts,
  store,
  subscribe,
} from "./rt_common.js";
import { vramTimeline } from "./rt_timeline.js";

export const TAB_ID = "run-telemetry";
const DEVICE_REFRESH_MS = 10000;
const EVENT_REFRESH_MS = 400;
const RUNS_SHOWN = 10;
const COLLAPSED_KEY = "RunTelemetry.Sidebar.Collapsed";

function loadCollapsed() {
  try {
    return new Set(JSON.parse(localStorage.getItem(COLLAPSED_KEY) || "[]"));
  } catch {
    return new Set();
  }
}

const OUTCOME_TEXT = {
  running: "running",
  queued: "queued",
  success: "success",
  error: "error",
  interrupted: "interrupted",
  crashed: "crashed",
  cancelled: "cancelled before it ran",
  lost: "lost (queued when ComfyUI stopped)",
};

const secs = (v) => `${v} s`;
const POLICY_LABELS = {
  SceneRetryBudget: ["Retry budget", (v) => `${v} requeue${v === 1 ? "" : "s"}`],
  HistoryMaxWaitSeconds: ["Max wait", secs],
  HistoryMaxAttempts: ["History attempts", (v) => (v === 0 ? "unbounded" : String(v))],
  HistoryPollIntervalSeconds: ["Poll interval", secs],
  PostExecutionTimeoutSeconds: ["Post-exec timeout", secs],
};

function badge(kind, text, title) {
  return h("span", { class: `rt-badge rt-b-${kind}`, title }, text);
}

function outcomeBadge(outcome) {
  return h(
    "span",
    { class: `rt-badge rt-b-${outcome || "unknown"}`, "data-rt-outcome": outcome || "unknown" },
    OUTCOME_TEXT[outcome] || outcome || "unknown",
  );
}

function markerBadges(markers) {
  if (!markers?.length) {
    return [h("span", { class: "rt-badge rt-b-none", "data-rt-marker-state": "none" }, "marker: none")];
  }
  return markers.map((m) =>
    h(
      "span",
      {
        class: `rt-badge rt-b-marker-${m.State}`,
        "data-rt-marker-state": m.State,
        title: [m.Path || `${m.Prefix}`, m.Error].filter(Boolean).join("\n"),
      },
      `${MARKER_MARK[m.State] || "\u2026"} ${MARKER_LABEL[m.State] || m.State}`,
    ),
  );
}

function vramLine(before, after, delta, units, label = "free") {
  if (!isNum(before) && !isNum(after)) return null;
  const d = isNum(delta) ? delta : isNum(before) && isNum(after) ? after - before : null;
  return h(
    "div",
    {
      class: "rt-vram rt-row rt-wrap",
      title: "Free memory before \u2192 after; a negative delta means memory was taken.",
    },
    h("span", { class: "rt-muted rt-nw" }, label),
    h(
      "span",
      { class: "rt-nw" },
      `${fmtMem(before, units).replace(/ [MG]iB$/, "")} \u2192 ${fmtMem(after, units)} `,
      h(
        "span",
        {
          class: `rt-delta ${memoryTaken(d) ? "rt-taken" : isNum(d) && d >= 0.5 ? "rt-freed" : ""}`,
          "data-rt-delta": isNum(d) ? String(d) : "",
        },
        `(${fmtDelta(d, units).replace(/ [MG]iB$/, "")})`,
      ),
    ),
  );
}

function tags(runId, sceneId) {
  const out = [];
  if (runId) out.push(h("span", { class: "rt-tag", title: "Run" }, h("i", { class: "pi pi-folder" }), ` ${runId}`));
  if (sceneId)
    out.push(h("span", { class: "rt-tag", title: "Scene" }, h("i", { class: "pi pi-image" }), ` scene ${sceneId}`));
  return out;
}

function warnings(notes) {
  return (notes || []).map((n) =>
    h("div", { class: "rt-warn", role: "note" }, h("i", { class: "pi pi-exclamation-triangle" }), ` ${n}`),
  );
}

/** The store's trouble (damaged and moved aside, in memory only, locked), shown apart from the other notes. */
function storeWarning(sh) {
  if (!sh || sh.Ok !== false) return null;
  const where =
    sh.Mode === "memory"
      ? "records are kept in memory only and are lost on restart"
      : sh.KeptFile
        ? "a fresh store is in use"
        : "writes wait and are retried";
  return h(
    "div",
    { class: "rt-warn rt-store-warn", role: "alert", "data-rt-store": sh.Mode || "" },
    h("i", { class: "pi pi-database" }),
    ` Telemetry store: ${sh.Problem || "problem"} — ${where}`,
    sh.KeptFile ? h("div", { class: "rt-path" }, `kept: ${sh.KeptFile}`) : null,
    sh.Since ? h("div", { class: "rt-muted" }, `since ${fmtClock(sh.Since)}`) : null,
  );
}

/** One line for GET /telemetry/health: the overall status and what fails. */
function healthLine(health) {
  if (!health || !health.Status) return null;
  const failing = health.Failing || [];
  return h(
    "div",
    {
      class: `rt-health rt-health-${health.Status}`,
      "data-rt-health": health.Status,
      role: health.Status === "ok" ? "status" : "alert",
      title: "GET /telemetry/health",
    },
    h("i", { class: `pi ${health.Status === "ok" ? "pi-check-circle" : "pi-exclamation-circle"}` }),
    ` Health: ${health.Status}`,
    ...failing.map((c) => h("div", { class: "rt-muted" }, `${c.Name}: ${c.Detail}`)),
  );
}

class Panel {
  constructor(el) {
    this.el = el;
    this.expanded = new Set();
    this.collapsed = loadCollapsed();
    this.dirty = new Set();
    this.frame = 0;
    this.statusTimer = 0;
    this.runsTimer = 0;
    this.lastUpdated = null;
    this.sections = {
      device: h("section", { class: "rt-section rt-device" }),
      webhooks: h("section", { class: "rt-section rt-webhooks", hidden: true }),
      timeline: h("section", { class: "rt-section rt-timeline-section" }),
      prompts: h("section", { class: "rt-section rt-prompts" }),
      runs: h("section", { class: "rt-section rt-runs" }),
    };
    this.updated = h("span", { class: "rt-muted rt-updated" });
    this.root = h(
      "div",
      { class: "rt-panel", "data-rt-panel": "1" },
      h(
        "header",
        { class: "rt-header" },
        h("span", { class: "rt-title" }, h("i", { class: "pi pi-chart-line" }), " Run Telemetry"),
        this.updated,
        h(
          "button",
          { class: "rt-icon-btn", title: "Refresh now", "aria-label": "Refresh", onclick: () => this.refreshAll() },
          h("i", { class: "pi pi-refresh" }),
        ),
      ),
      this.sections.device,
      this.sections.webhooks,
      this.sections.timeline,
      this.sections.prompts,
      this.sections.runs,
    );
  }

  open() {
    this.el.replaceChildren(this.root);
    this.unsubscribe = subscribe((kind, detail) => this.onStore(kind, detail));
    this.markDirty("device", "timeline", "prompts", "runs");
    this.refreshAll();
    this.deviceTimer = setInterval(() => {
      if (document.visibilityState === "visible") refreshStatus(promptsShown());
    }, DEVICE_REFRESH_MS);
  }

  destroy() {
    this.unsubscribe?.();
    clearInterval(this.deviceTimer);
    clearTimeout(this.statusTimer);
    clearTimeout(this.runsTimer);
    if (this.frame) cancelAnimationFrame(this.frame);
    this.closed = true;
  }

  refreshAll() {
    refreshStatus(promptsShown());
    refreshRuns().then(() => {
      for (const id of this.expanded) refreshRun(id);
    });
  }

  onStore(kind, detail) {
    if (this.closed) return;
    if (kind === "status") this.markDirty("device", "webhooks", "timeline", "prompts", "runs");
    else if (kind === "prompt") {
      this.markDirty("timeline", "prompts");
      if (FINAL_OUTCOMES.has(detail?.Outcome)) {
        // The device's memory changed; a run's scene may have ended.
        this.later("statusTimer", () => refreshStatus(promptsShown()));
        if (detail.RunId && store.runsAvailable !== false) {
          this.later("runsTimer", () =>
            refreshRuns().then(() => {
              if (this.expanded.has(detail.RunId)) refreshRun(detail.RunId);
            }),
          );
        }
      }
    } else if (kind === "runs" || kind === "run") this.markDirty("runs");
    else if (kind === "settings") {
      this.markDirty("device", "timeline", "prompts", "runs");
      if (store.prompts.size < promptsShown()) this.later("statusTimer", () => refreshStatus(promptsShown()));
    } else if (kind === "reconnected") this.refreshAll();
  }

  later(name, fn) {
    clearTimeout(this[name]);
    this[name] = setTimeout(() => {
      if (!this.closed) fn();
    }, EVENT_REFRESH_MS);
  }

  markDirty(...names) {
    for (const n of names) this.dirty.add(n);
    if (!this.frame) {
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        this.render();
      });
    }
  }

  render() {
    const units = setting(SETTING.units);
    const names = [...this.dirty];
    this.dirty.clear();
    for (const name of names) {
      const section = this.sections[name];
      try {
        section.replaceChildren(...this[`render_${name}`](units));
      } catch (err) {
        console.error(`[Run Telemetry] could not draw the ${name} section`, err);
        section.replaceChildren(h("div", { class: "rt-error" }, `Could not draw this section: ${err.message}`));
      }
    }
    this.lastUpdated = new Date();
    this.updated.textContent = store.version ? `v${store.version}` : "";
    this.updated.title = `updated ${this.lastUpdated.toLocaleTimeString([], { hour12: false })}`;
  }

  /** A section title that folds the section (remembered across reloads). */
  head(name, title, ...extra) {
    const folded = this.collapsed.has(name);
    return h(
      "button",
      {
        class: "rt-h rt-toggle",
        "aria-expanded": folded ? "false" : "true",
        "data-rt-section": name,
        onclick: () => {
          if (this.collapsed.has(name)) this.collapsed.delete(name);
          else this.collapsed.add(name);
          try {
            localStorage.setItem(COLLAPSED_KEY, JSON.stringify([...this.collapsed]));
          } catch {
            // private mode: folding still works for this page
          }
          this.markDirty(name);
        },
      },
      h("i", { class: `pi rt-chev ${folded ? "pi-chevron-right" : "pi-chevron-down"}` }),
      h("span", {}, title),
      ...extra,
    );
  }

  render_device(units) {
    const out = [this.head("device", "Device now")];
    if (this.collapsed.has("device")) return out;
    const snap = store.snapshot;
    if (store.statusError && !snap) {
      out.push(h("div", { class: "rt-error" }, `GET /telemetry failed: ${store.statusError}`));
      return out;
    }
    if (!snap) {
      out.push(h("div", { class: "rt-empty" }, "Loading\u2026"));
      return out;
    }
    const dev = snap.Device || {};
    const total = bytesToMiB(dev.VramTotal);
    const free = bytesToMiB(dev.VramFree);
    const used = isNum(dev.VramUsed) ? bytesToMiB(dev.VramUsed) : isNum(total) && isNum(free) ? total - free : null;
    const pct = isNum(used) && isNum(total) && total > 0 ? Math.max(0, Math.min(100, (used / total) * 100)) : null;
    const isCpu = dev.Type === "cpu";
    out.push(
      h(
        "div",
        { class: "rt-dev-name" },
        h("span", { class: "rt-strong", "data-rt-device": dev.Name || "" }, dev.Name || "unknown device"),
        dev.Type ? h("span", { class: "rt-tag" }, dev.Type + (isNum(dev.Index) ? ` ${dev.Index}` : "")) : null,
        h(
          "span",
          { class: "rt-source", "data-rt-source": snap.Source || "", title: "The probe that answered" },
          `via ${snap.Source || "?"}`,
        ),
      ),
      h(
        "div",
        {
          class: "rt-bar",
          role: "meter",
          "aria-valuemin": "0",
          "aria-valuemax": "100",
          "aria-valuenow": isNum(pct) ? pct.toFixed(0) : undefined,
          title: isCpu ? "CPU mode: system RAM stands in for VRAM" : "VRAM used",
        },
        h("div", {
          class: `rt-bar-fill ${pct > 90 ? "rt-hot" : pct > 70 ? "rt-warm" : ""}`,
          style: { width: `${isNum(pct) ? pct : 0}%` },
        }),
      ),
      h(
        "div",
        { class: "rt-dev-mem" },
        h("span", {}, `${isCpu ? "RAM" : "VRAM"} used `, h("b", {}, fmtMem(used, units)), ` / ${fmtMem(total, units)}`),
        h("span", { class: "rt-muted" }, isNum(pct) ? `${pct.toFixed(0)}% \u00b7 free ${fmtMem(free, units)}` : ""),
      ),
    );
    const others = (snap.Devices || []).filter((d) => d.Name !== dev.Name || d.Index !== dev.Index);
    for (const d of others) {
      const t = bytesToMiB(d.VramTotal);
      const f = bytesToMiB(d.VramFree);
      out.push(
        h(
          "div",
          { class: "rt-muted rt-other-dev" },
          `${d.Name}${isNum(d.Index) ? ` #${d.Index}` : ""}: ` +
            `${fmtMem(isNum(t) && isNum(f) ? t - f : null, units)} / ${fmtMem(t, units)}`,
        ),
      );
    }
    const hl = healthLine(store.health);
    if (hl) out.push(hl);
    const storeWarn = storeWarning(store.storeHealth);
    if (storeWarn) out.push(storeWarn);
    // The store's own note is the warning above: not twice.
    const notes = [...new Set([...(store.notes || []), ...(snap.FallbackNotes || [])])].filter(
      (n) => !(storeWarn && n.startsWith("telemetry store ")),
    );
    out.push(...warnings(notes));
    return out;
  }

  /** One warning line while webhook deliveries fail (GET /telemetry's Webhooks summary); nothing otherwise. */
  render_webhooks() {
    const hooks = store.webhooks;
    const failing = hooks?.Failing || [];
    this.sections.webhooks.hidden = !failing.length;
    if (!failing.length) return [];
    const where = failing.map((f) => f.Url).join(", ");
    const last = failing.find((f) => f.LastError)?.LastError;
    return [
      h(
        "div",
        {
          class: "rt-warn",
          role: "status",
          "data-rt-webhooks": "failing",
          title: "GET /telemetry/webhooks lists every endpoint, its last error and the deliveries given up",
        },
        h("i", { class: "pi pi-exclamation-triangle" }),
        ` Webhook deliveries failing to ${where}` +
          (last ? ` (${last})` : "") +
          ` \u00b7 ${hooks.Pending} pending, ${hooks.GivenUp} given up`,
      ),
    ];
  }

  visiblePrompts() {
    return sortedPrompts().slice(0, promptsShown());
  }

  render_timeline(units) {
    const head = this.head("timeline", "VRAM timeline", h("span", { class: "rt-muted rt-h-note" }, "free, per prompt"));
    if (this.collapsed.has("timeline")) return [head];
    return [head, vramTimeline(this.visiblePrompts(), units)];
  }

  render_prompts(units) {
    const list = this.visiblePrompts();
    const out = [this.head("prompts", "Recent prompts", h("span", { class: "rt-count" }, String(list.length)))];
    if (this.collapsed.has("prompts")) return out;
    if (!list.length) {
      out.push(h("div", { class: "rt-empty" }, "No prompts recorded yet. Queue one and it appears here live."));
      return out;
    }
    out.push(
      h(
        "div",
        { class: "rt-list" },
        list.map((p) => this.promptCard(p, units)),
      ),
    );
    return out;
  }

  promptCard(p, units) {
    const err = p.Error;
    return h(
      "div",
      { class: `rt-card rt-prompt rt-o-${p.Outcome}`, "data-rt-prompt": p.PromptId, title: `prompt ${p.PromptId}` },
      h(
        "div",
        { class: "rt-row rt-wrap" },
        outcomeBadge(p.Outcome),
        h("span", { class: "rt-dur rt-nw", title: "Duration" }, fmtSeconds(p.DurationSeconds)),
        h("span", { class: "rt-muted rt-nw", title: "Queue wait" }, `wait ${fmtSeconds(p.QueueWaitSeconds)}`),
        h("span", { class: "rt-muted rt-time rt-nw" }, fmtClock(p.EndedAt || p.StartedAt || p.QueuedAt)),
      ),
      vramLine(p.VramBeforeMB, p.VramAfterMB, p.VramDeltaMB, units),
      h("div", { class: "rt-row rt-wrap" }, ...tags(p.RunId, p.SceneId), ...markerBadges(p.Markers)),
      (p.Spans || []).length
        ? h(
            "div",
            { class: "rt-spans" },
            p.Spans.map((s) =>
              h(
                "span",
                { class: "rt-span", title: `Telemetry Capture #${s.NodeId}` },
                `${s.Label}: ${fmtSeconds(s.Seconds)}`,
                isNum(s.VramDeltaMB)
                  ? h(
                      "span",
                      { class: `rt-delta ${memoryTaken(s.VramDeltaMB) ? "rt-taken" : ""}` },
                      ` ${fmtDelta(s.VramDeltaMB, units)}`,
                    )
                  : null,
              ),
            ),
          )
        : null,
      err ? h("div", { class: "rt-err-line" }, errorText(err, p.Outcome)) : null,
      ...warnings(p.FallbackNotes),
    );
  }

  render_runs(units) {
    if (store.runsAvailable === false) {
      this.sections.runs.hidden = true;
      return [];
    }
    this.sections.runs.hidden = false;
    const runs = store.runs;
    const out = [this.head("runs", "Runs", runs ? h("span", { class: "rt-count" }, String(runs.length)) : null)];
    if (this.collapsed.has("runs")) return out;
    if (store.runsError) out.push(h("div", { class: "rt-error" }, `GET /telemetry/runs failed: ${store.runsError}`));
    if (store.policy) out.push(this.policyCard(store.policy, { collapsible: true }));
    if (!runs) {
      out.push(h("div", { class: "rt-empty" }, "Loading\u2026"));
      return out;
    }
    if (!runs.length) {
      out.push(
        h(
          "div",
          { class: "rt-empty" },
          "No runs yet. Tag prompts with a run (Telemetry Capture node or extra_data.telemetry.run_id).",
        ),
      );
      return out;
    }
    const shown = this.allRuns ? runs : runs.slice(0, RUNS_SHOWN);
    out.push(
      h(
        "div",
        { class: "rt-list" },
        shown.map((r) => this.runCard(r, units)),
      ),
    );
    if (runs.length > RUNS_SHOWN) {
      out.push(
        h(
          "button",
          {
            class: "rt-more",
            onclick: () => {
              this.allRuns = !this.allRuns;
              this.markDirty("runs");
            },
          },
          this.allRuns ? "Show fewer runs" : `Show all ${runs.length} runs`,
        ),
      );
    }
    return out;
  }

  policyCard(policy, { title = "Queue policy", collapsible = false } = {}) {
    const cfg = policy.QueueConfig || policy;
    const rows = Object.entries(cfg).filter(([, v]) => typeof v === "number" || typeof v === "string");
    const open = !collapsible || this.policyOpen;
    const brief = rows
      .filter(([k]) => k === "SceneRetryBudget" || k === "HistoryMaxWaitSeconds")
      .map(([k, v]) => `${POLICY_LABELS[k][0].toLowerCase()} ${POLICY_LABELS[k][1](v)}`)
      .join(" \u00b7 ");
    const head = [h("i", { class: "pi pi-sliders-h" }), h("span", { class: "rt-strong" }, title)];
    return h(
      "div",
      { class: "rt-card rt-policy", "data-rt-policy": collapsible ? "global" : "run" },
      collapsible
        ? h(
            "button",
            {
              class: "rt-card-title rt-toggle",
              "aria-expanded": open ? "true" : "false",
              onclick: () => {
                this.policyOpen = !this.policyOpen;
                this.markDirty("runs");
              },
            },
            h("i", { class: `pi ${open ? "pi-chevron-down" : "pi-chevron-right"}` }),
            ...head,
            open ? null : h("span", { class: "rt-muted rt-ellipsis" }, brief),
          )
        : h("div", { class: "rt-card-title" }, ...head),
      open
        ? h(
            "dl",
            { class: "rt-kv" },
            rows.map(([k, v]) => {
              const [label, fmt] = POLICY_LABELS[k] || [k, String];
              return [h("dt", {}, label), h("dd", {}, fmt(v))];
            }),
          )
        : null,
      ...warnings(policy.Notes),
    );
  }

  toggleRun(id) {
    if (this.expanded.has(id)) this.expanded.delete(id);
    else {
      this.expanded.add(id);
      refreshRun(id);
    }
    this.markDirty("runs");
  }

  runCard(run, units) {
    const id = run.RunId;
    const open = this.expanded.has(id);
    const status = run.Status || (run.Pending ? "running" : run.Failed ? "failed" : "complete");
    return h(
      "div",
      { class: `rt-card rt-run ${open ? "rt-open" : ""}`, "data-rt-run": id },
      h(
        "button",
        { class: "rt-run-head", "aria-expanded": open ? "true" : "false", onclick: () => this.toggleRun(id) },
        h("i", { class: `pi ${open ? "pi-chevron-down" : "pi-chevron-right"}` }),
        h("span", { class: "rt-strong rt-run-id", title: id }, id),
        badge(status === "complete" ? "success" : status === "failed" ? "error" : "running", status),
      ),
      h(
        "div",
        { class: "rt-row rt-wrap rt-muted rt-run-sub" },
        h("span", { class: "rt-nw" }, `${run.Succeeded ?? 0}/${run.Scenes ?? 0} scenes ok`),
        h("span", { class: "rt-nw" }, `${run.Prompts ?? 0} prompt${run.Prompts === 1 ? "" : "s"}`),
        run.Failed ? h("span", { class: "rt-taken rt-nw" }, `${run.Failed} failed`) : null,
        run.Pending ? h("span", { class: "rt-nw" }, `${run.Pending} pending`) : null,
        run.LastActivity ? h("span", { class: "rt-nw" }, fmtAgo(run.LastActivity)) : null,
        run.Finalized ? h("span", { class: "rt-final rt-nw" }, "\u2713 finalized") : null,
      ),
      open ? this.runBody(run, units) : null,
    );
  }

  runBody(run, units) {
    const id = run.RunId;
    const detail = store.runDetails.get(id) || {};
    const meta = detail.meta;
    const body = [];
    if (detail.error) body.push(h("div", { class: "rt-error" }, detail.error));
    if (!meta && detail.loading) body.push(h("div", { class: "rt-empty" }, "Loading\u2026"));
    if (meta) {
      const budget = meta.QueueConfig?.SceneRetryBudget;
      body.push(
        h(
          "div",
          { class: "rt-scenes" },
          (meta.Scenes || []).map((s) => this.sceneRow(s, budget, units)),
        ),
      );
      if (meta.QueueConfig)
        body.push(this.policyCard({ QueueConfig: meta.QueueConfig }, { title: "Queue policy of this run" }));
    }
    body.push(this.runActions(run));
    return h("div", { class: "rt-run-body" }, body);
  }

  sceneRow(scene, budget, units) {
    const tel = scene.Telemetry || {};
    const gpu = tel.GPU || {};
    const attempts = scene.AttemptSummaries || [];
    const last = attempts[attempts.length - 1];
    const outcome = last?.Outcome || (scene.Success ? "success" : "error");
    const attemptsRun = scene.AttemptsRun ?? (attempts.length || 1);
    // Retries: attempts the run's retry budget queued (RetryOf); a scene queued again by hand is only an attempt.
    const retries = attempts.filter((a) => a.RetryOf).length;
    return h(
      "div",
      { class: `rt-scene rt-o-${outcome}`, "data-rt-scene": scene.SceneId },
      h(
        "div",
        { class: "rt-row" },
        outcomeBadge(outcome),
        h("span", { class: "rt-strong" }, `Scene ${scene.SceneId}`),
        scene.Title ? h("span", { class: "rt-muted rt-ellipsis", title: scene.Title }, scene.Title) : null,
        h("span", { class: "rt-spacer" }),
        h("span", { class: "rt-dur" }, fmtSeconds(tel.DurationSeconds)),
      ),
      vramLine(gpu.VramBeforeMB, gpu.VramAfterMB, gpu.VramDeltaMB, units),
      h(
        "div",
        { class: "rt-row rt-wrap" },
        isNum(scene.FrameCount)
          ? badge(
              scene.MeetsFrameFloor === false ? "warn" : "none",
              plural(scene.FrameCount, "frame") + (scene.FrameFloor ? ` / floor ${scene.FrameFloor}` : ""),
            )
          : null,
        badge(
          retries ? "warn" : "none",
          plural(attemptsRun, "attempt") + (retries ? ` \u00b7 ${plural(retries, "retry", "retries")}` : ""),
          isNum(budget) ? `Retry budget of the run: ${budget}` : undefined,
        ),
        scene.Requeued ? badge("warn", "requeued") : null,
      ),
      ...attempts
        .filter((a) => a.Outcome && a.Outcome !== "success" && a.Outcome !== "running" && a.Outcome !== "queued")
        .map((a) =>
          h(
            "div",
            { class: a === last ? "rt-err-line" : "rt-muted rt-small" },
            `attempt ${a.Attempt}: ${a.Outcome}${a.Error ? ` \u2013 ${a.Error}` : ""}`,
          ),
        ),
      ...warnings(scene.Warnings),
    );
  }

  runActions(run) {
    const id = run.RunId;
    const enc = encodeURIComponent(id);
    const finalized = run.Finalized !== false;
    const result = store.finalizeResults.get(id);
    const link = (file) =>
      finalized
        ? h(
            "a",
            {
              class: "rt-link",
              href: routeUrl(`/telemetry/runs/${enc}/${file}`),
              target: "_blank",
              rel: "noopener",
              "data-rt-file": file,
            },
            h("i", { class: "pi pi-file" }),
            ` ${file}`,
          )
        : h(
            "span",
            { class: "rt-link rt-disabled", title: "Finalize the run first", "data-rt-file": file },
            h("i", { class: "pi pi-file" }),
            ` ${file}`,
          );
    const out = [
      h(
        "div",
        { class: "rt-row rt-wrap rt-actions" },
        link("artifact-metadata.json"),
        link("run-summary.txt"),
        h("span", { class: "rt-spacer" }),
        h(
          "button",
          {
            class: "rt-btn",
            "data-rt-finalize": id,
            disabled: result?.pending ? true : undefined,
            title: "Write artifact-metadata.json and run-summary.txt for this run now, and validate them",
            onclick: () => finalizeRun(id),
          },
          h("i", { class: "pi pi-check-square" }),
          result?.pending ? " Finalizing\u2026" : run.Finalized ? " Finalize again" : " Finalize",
        ),
      ),
    ];
    if (result && !result.pending) {
      if (result.error)
        out.push(
          h("div", { class: "rt-error", "data-rt-finalize-result": "error" }, `Finalize failed: ${result.error}`),
        );
      else {
        out.push(
          h(
            "div",
            {
              class: result.Valid ? "rt-ok" : "rt-warn",
              "data-rt-finalize-result": result.Valid ? "valid" : "invalid",
            },
            result.Valid ? "\u2713 Finalized and valid" : "Finalized with problems:",
            result.MetadataPath ? h("div", { class: "rt-muted rt-path" }, result.MetadataPath) : null,
          ),
          ...(result.Problems || []).map((p) =>
            h("div", { class: "rt-warn" }, typeof p === "string" ? p : JSON.stringify(p)),
          ),
        );
      }
    }
    return out;
  }
}

let panel = null;

app.registerExtension({
  name: "RunTelemetry.Sidebar",
  setup() {
    const manager = app.extensionManager;
    if (typeof manager?.registerSidebarTab !== "function") {
      console.warn("[Run Telemetry] this ComfyUI frontend has no sidebar tabs; the Telemetry tab is not available");
      return;
    }
    ensureStyles();
    manager.registerSidebarTab({
      id: TAB_ID,
      icon: "pi pi-chart-line",
      title: "Telemetry",
      label: "Telemetry",
      tooltip: "Run Telemetry: device memory, recent prompts, runs",
      type: "custom",
      render(el) {
        if (panel && panel.el === el && !panel.closed) return;
        panel?.destroy();
        panel = new Panel(el);
        panel.open();
      },
      destroy() {
        panel?.destroy();
        panel = null;
      },
    });
  },
});
