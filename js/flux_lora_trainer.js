// FLUX LoRA Trainer: the pack's web extension (ComfyUI extension API only: registerExtension,
// beforeRegisterNodeDef, addDOMWidget, api.addEventListener).
//
// - Train node: a live loss chart (loss, its moving average, lr on a second axis, validation loss) with a status
//   line (step/total, it/s, ETA) from the train node's websocket messages (js/event_schema.js, generated from
//   trainer/event_schema.py: the event names and every message's fields). A new run (a new prompt id) starts a
//   new chart. The history is kept in the node's properties (thinned to MAX_STORED_POINTS), so a reloaded page or a
//   saved and re-opened workflow draws it again; the node's executed output (`loss`: every step's loss) replaces
//   it when the run ends.
// - Network node: a block picker (19 double, 38 single blocks) kept in sync both ways with block_preset,
//   double_blocks and single_blocks, showing the per-layer ranks that apply.
// - Every node of ours with a text output shows it (the dataset nodes' pre-flight report, what the memory node's
//   `auto` picked, ...), and the memory node also shows what the train node's `auto` finally picked (its
//   `memory_plan` message).
//
// Our widgets are never saved in widgets_values nor sent with the prompt (serialize: false), so workflows and
// prompts stay exactly what the nodes define.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { LossChart, chartColors } from "./lib/chart.js";
import { BlockPicker } from "./lib/picker.js";
import { EVENTS } from "./event_schema.js";
import { applyMessage, emptyHistory, readHistory, setLosses, thinned } from "./lib/series.js";
import { StatusBox } from "./lib/status.js";
import { addStyle } from "./lib/style.js";

const EXTENSION = "FluxLoraTrainer.NodeUI";
const TRAIN = "FluxLoraTrainerTrain";
const NETWORK = "FluxLoraTrainerNetwork";
const MEMORY = "FluxLoraTrainerMemory";
export const CHART_PROPERTY = "flux_lora_trainer_chart";
export const STATUS_PROPERTY = "flux_lora_trainer_status";
const MARGIN = 6; // around each of our DOM widgets (ComfyUI's default is 10), included in the heights below
const PICKER_HEIGHT = 176 + 2 * MARGIN;
const CHART_MIN_HEIGHT = 220 + 2 * MARGIN;
const CHART_MAX_HEIGHT = 360 + 2 * MARGIN;

// nodes whose executed ui `text` is shown (the box's tooltip says what it holds)
const STATUS_NODES = {
  FluxLoraTrainerModels: "What the models node found (shown when it runs)",
  FluxLoraTrainerDataset: "Pre-flight report: images, captions, buckets, batches (shown when the node runs)",
  FluxLoraTrainerDatasetToml: "Pre-flight report: images, captions, buckets, batches (shown when the node runs)",
  FluxLoraTrainerImageDataset: "Images from the graph (sizes, captions, masks, cache folder) and the pre-flight report (shown when the node runs)",
  FluxLoraTrainerNetwork: "The LoRA layout (shown when the node runs)",
  FluxLoraTrainerOptimizer: "The optimizer settings (shown when the node runs)",
  FluxLoraTrainerMemory: "The memory settings; with auto, what was picked (shown when the node and the train node run)",
  FluxLoraTrainerTrain: "The LoRA file, the run folder and the log (shown when training ends)",
  FluxLoraTrainerCheckpoints: "The checkpoints and strengths, one label per image (shown when the node runs)",
};

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

/** set a widget as a user's edit does (value, callback, onWidgetChanged, graph version) */
function setWidget(node, name, value) {
  const w = widget(node, name);
  if (!w || w.value === value) return;
  const old = w.value;
  w.value = value;
  w.callback?.(w.value, app.canvas, node, app.canvas?.graph_mouse, undefined);
  node.onWidgetChanged?.(name, w.value, old, w);
  if (node.graph) node.graph._version++;
  node.setDirtyCanvas?.(true, true);
}

/** the node of an execution id ("12", or "5:12" inside subgraph node 5) */
function nodeFor(id) {
  if (id === null || id === undefined || !app.graph) return null;
  let graph = app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    node = graph?.getNodeById?.(part) ?? graph?.getNodeById?.(Number(part)) ?? null;
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

function addBox(node, name, element, minHeight, maxHeight, onDraw) {
  const w = node.addDOMWidget(name, `flux_lora_trainer_${name}`, element, {
    serialize: false, // neither in widgets_values nor in the prompt
    hideOnZoom: true,
    margin: MARGIN,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: minHeight,
    getMaxHeight: maxHeight,
    onDraw,
  });
  w.serialize = false;
  return w;
}

function grow(node) {
  const min = node.computeSize?.();
  if (min && node.size && node.size[1] < min[1]) node.setSize([node.size[0], min[1]]);
  node.setDirtyCanvas?.(true, true);
}

// ------------------------------------------------------------------------------------------------ status text

function showStatus(node) {
  const s = node.__flt;
  if (!s?.status) return;
  const text = s.picked ? `${s.ownText}${s.ownText ? "\n\n" : ""}picked by the train node (last run):\n${s.picked}`
    : s.ownText;
  s.status.set(text);
  node.properties = node.properties || {};
  node.properties[STATUS_PROPERTY] = { text: s.ownText, picked: s.picked };
  grow(node);
}

function setupStatus(node) {
  const s = node.__flt;
  s.ownText = "";
  s.picked = "";
  s.status = new StatusBox(STATUS_NODES[node.comfyClass]);
  const height = () => {
    const h = s.status.minHeight((node.size?.[0] ?? 300) - 2 * MARGIN);
    return h ? h + 2 * MARGIN : 0;
  };
  addBox(node, "status", s.status.element, height, height);
}

// ------------------------------------------------------------------------------------------------ loss chart

function setupChart(node) {
  const s = node.__flt;
  s.history = emptyHistory();
  node.properties = node.properties || {};
  node.properties[CHART_PROPERTY] = s.history;
  s.chart = new LossChart(s.history);
  s.colorsKey = "";
  addBox(node, "loss_chart", s.chart.element, () => CHART_MIN_HEIGHT, () => CHART_MAX_HEIGHT, () => {
    // the canvas is drawn by us, not by CSS: redraw when the theme's colours change
    const c = chartColors(s.chart.element);
    const key = `${c.background}|${c.text}|${c.grid}`;
    if (key !== s.colorsKey) {
      s.colorsKey = key;
      s.chart.schedule();
    }
  });
}

/** one of the train node's websocket messages (`type` a key of EVENTS) */
function trainerMessage(type, detail) {
  const node = nodeFor(detail?.node);
  if (type === "memory_plan") {
    if (node) forwardMemoryPlan(node, detail);
    return;
  }
  const s = node?.__flt;
  if (!s?.chart) return;
  if (applyMessage(s.history, type, detail)) s.chart.rate = [];
  if (type === "step") s.chart.noteStep(Number(detail.step));
  s.chart.update();
  node.setDirtyCanvas?.(true, false);
}

/** the train node's `auto` memory plan -> the memory node linked to it */
function forwardMemoryPlan(train, plan) {
  const slot = train.findInputSlot?.("memory") ?? -1;
  const memory = slot >= 0 ? train.getInputNode?.(slot) : null;
  if (memory?.comfyClass === MEMORY && memory.__flt?.status) {
    memory.__flt.picked = plan.lines.join("\n");
    showStatus(memory);
  }
}

function runEnded(detail, state) {
  for (const node of app.graph?._nodes ?? []) {
    const s = node.__flt;
    if (s?.chart && s.history.prompt_id && s.history.prompt_id === detail?.prompt_id && s.history.state === "running") {
      s.history.state = state;
      s.chart.update();
    }
  }
}

// ------------------------------------------------------------------------------------------------ block picker

const PICKER_WIDGETS = ["block_preset", "double_blocks", "single_blocks", "train_blocks", "network_dim", "network_args",
                        "img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim",
                        "single_dim", "single_mod_dim"];

function setupPicker(node) {
  const s = node.__flt;
  s.picker = new BlockPicker(node, setWidget, () => node.setDirtyCanvas?.(true, true));
  for (const name of PICKER_WIDGETS) {
    const w = widget(node, name);
    if (!w) continue;
    const callback = w.callback;
    w.callback = function (value, ...rest) {
      const out = callback?.apply(this, [value, ...rest]);
      if (name === "block_preset") s.picker.presetChosen(value);
      else s.picker.sync();
      return out;
    };
  }
  addBox(node, "block_picker", s.picker.element, () => PICKER_HEIGHT, () => PICKER_HEIGHT, () => s.picker.sync());
}

// ------------------------------------------------------------------------------------------------ extension

app.registerExtension({
  name: EXTENSION,

  async setup() {
    addStyle();
    for (const [type, event] of Object.entries(EVENTS)) {
      api.addEventListener(event, ({ detail }) => trainerMessage(type, detail));
    }
    api.addEventListener("execution_interrupted", ({ detail }) => runEnded(detail, "stopped"));
    api.addEventListener("execution_error", ({ detail }) => runEnded(detail, "error"));
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name;
    if (!(name in STATUS_NODES)) return;
    addStyle();
    const proto = nodeType.prototype;

    const onNodeCreated = proto.onNodeCreated;
    proto.onNodeCreated = function () {
      const out = onNodeCreated?.apply(this, arguments);
      this.__flt = {};
      if (name === NETWORK) setupPicker(this);
      if (name === TRAIN) setupChart(this);
      setupStatus(this);
      const min = this.computeSize();
      this.setSize([Math.max(this.size[0], min[0]), Math.max(this.size[1], min[1])]);
      return out;
    };

    const onConfigure = proto.onConfigure;
    proto.onConfigure = function (info) {
      const out = onConfigure?.apply(this, arguments);
      const s = this.__flt;
      if (!s) return out;
      if (s.chart) {
        s.history = readHistory(this.properties?.[CHART_PROPERTY]);
        this.properties[CHART_PROPERTY] = s.history;
        s.chart.setHistory(s.history);
      }
      if (s.status) {
        const saved = this.properties?.[STATUS_PROPERTY];
        s.ownText = typeof saved?.text === "string" ? saved.text : "";
        s.picked = typeof saved?.picked === "string" ? saved.picked : "";
        showStatus(this);
      }
      s.picker?.render();
      return out;
    };

    const onSerialize = proto.onSerialize;
    proto.onSerialize = function (o) {
      onSerialize?.apply(this, arguments);
      const s = this.__flt;
      if (s?.chart && o?.properties) o.properties[CHART_PROPERTY] = thinned(s.history);
    };

    const onExecuted = proto.onExecuted;
    proto.onExecuted = function (output) {
      const out = onExecuted?.apply(this, arguments);
      const s = this.__flt;
      if (!s) return out;
      if (s.chart && Array.isArray(output?.loss)) {
        setLosses(s.history, output.loss);
        s.history.message = "";
        s.chart.update();
      }
      if (s.status && Array.isArray(output?.text)) {
        s.ownText = output.text.join("\n");
        if (name === MEMORY && !s.ownText.startsWith("auto")) s.picked = ""; // manual: nothing is picked
        showStatus(this);
      }
      return out;
    };
  },
});
