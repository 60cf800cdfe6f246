// Run Telemetry: core extension. Listens for the package's websocket events.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

app.registerExtension({
  name: "RunTelemetry.Core",
  async setup() {
    api.addEventListener("telemetry.prompt", (event) => {
      window.__runTelemetryLast = event.detail;
    });
  },
});
