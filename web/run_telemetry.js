// Run Telemetry: settings, and a toast when a prompt leaves a .failed marker or a marker could not be written.
import { app, errorText, onPromptEvent, problemMarkers, repaintSettings, setting, SETTING } from "./rt_common.js";

const toasted = new Set(); // "<prompt>/<marker node>": one toast per marker, also when events repeat

function toast(message) {
  const toaster = app.extensionManager?.toast;
  if (typeof toaster?.add === "function") {
    toaster.add(message);
  } else {
    // Frontends without the toast API: the sidebar still shows the marker state.
    console.warn(`[Run Telemetry] ${message.summary}: ${message.detail}`);
  }
}

function announce(summary) {
  if (setting(SETTING.toasts) === false) return;
  for (const m of problemMarkers(summary)) {
    const key = `${summary.PromptId}/${m.NodeId}`;
    if (toasted.has(key)) continue;
    toasted.add(key);
    const where = [summary.RunId && `run ${summary.RunId}`, summary.SceneId && `scene ${summary.SceneId}`]
      .filter(Boolean)
      .join(", ");
    if (m.State === "failed") {
      const why = errorText(summary.Error, summary.Outcome);
      toast({
        severity: "error",
        summary: `Prompt ${summary.Outcome}: ${m.Prefix}.failed written`,
        detail: `${where ? `${where}. ` : ""}${why}`,
        life: 10000,
      });
    } else {
      toast({
        severity: "error",
        summary: `Done marker not written: ${m.Prefix}`,
        detail: `${where ? `${where}. ` : ""}${m.Error || "the marker could not be written"}`,
        life: 15000,
      });
    }
  }
}

app.registerExtension({
  name: "RunTelemetry.Core",
  settings: [
    {
      id: SETTING.promptsShown,
      category: ["Run Telemetry", "Sidebar", "Prompts shown"],
      name: "Prompts shown in the Telemetry tab",
      tooltip: "How many recent prompts the Telemetry sidebar lists and draws in its VRAM timeline (1-200).",
      type: "slider",
      attrs: { min: 1, max: 200, step: 1 },
      defaultValue: 20,
      onChange: () => repaintSettings(),
    },
    {
      id: SETTING.units,
      category: ["Run Telemetry", "Sidebar", "Memory units"],
      name: "Memory units",
      tooltip: "Show VRAM figures in MiB (1024\u00b2 bytes, as the telemetry records them) or GiB.",
      type: "combo",
      options: ["MiB", "GiB"],
      defaultValue: "MiB",
      onChange: () => repaintSettings(),
    },
    {
      id: SETTING.toasts,
      category: ["Run Telemetry", "Notifications", "Marker toasts"],
      name: "Toast when a done marker fails",
      tooltip:
        "Show a notification when a prompt leaves a <prefix>.failed marker or its done marker could not be written.",
      type: "boolean",
      defaultValue: true,
    },
    {
      id: SETTING.nodeBadges,
      category: ["Run Telemetry", "Nodes", "Node badges"],
      name: "Badges on Telemetry Capture and Write Done Marker nodes",
      tooltip:
        "After a prompt queued from this editor, show the span (seconds, VRAM delta) above Telemetry Capture nodes " +
        "and the marker state above Write Done Marker nodes.",
      type: "boolean",
      defaultValue: true,
      onChange: () => app.graph?.setDirtyCanvas?.(true, true),
    },
  ],
  setup() {
    onPromptEvent(announce);
  },
});
