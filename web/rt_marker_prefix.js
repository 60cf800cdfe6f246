// Run Telemetry: the Write Done Marker's filename_prefix gets the same text replacements as ComfyUI's own save nodes.
//
// ComfyUI's frontend expands %date:yyyy-MM-dd% and %NodeTitle.widget% in the filename_prefix of its save nodes
// (SaveImage & co.) before it sends the prompt; the server never sees those tokens. Without this, SaveImage and the
// marker given the same prefix text would land in different folders. Uses the frontend's own replacement function.
import { app } from "../../scripts/app.js";

const MARKER = "WriteDoneMarker";

app.registerExtension({
  name: "RunTelemetry.MarkerPrefix",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== MARKER) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created ? created.apply(this, arguments) : undefined;
      const widget = this.widgets?.find((w) => w.name === "filename_prefix");
      const replace = window.comfyAPI?.utils?.applyTextReplacements;
      if (widget && typeof replace === "function") {
        widget.serializeValue = () => replace(app, widget.value);
      }
      return result;
    };
  },
});
