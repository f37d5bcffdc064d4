// The block picker of the network node: the 19 double and 38 single blocks as a grid to click or drag over,
// preset buttons, and the per-layer ranks that apply to each kind. It reads and writes the node's own widgets
// (block_preset, double_blocks, single_blocks, read: train_blocks, network_dim, the *_dim ranks, network_args),
// so the text fields the core reads stay the source of truth and a saved workflow holds nothing extra.

import {
  BLOCK_PRESETS, DOUBLE_BLOCKS, DOUBLE_DIMS, SINGLE_BLOCKS, SINGLE_DIMS, effectiveSelection,
  formatBlockSelection, rankOf,
} from "./blocks.js";

// preset buttons: [label, block_preset value, double text, single text]
const BUTTONS = [
  ["all", "all", "all", "all"],
  ["none", "custom", "none", "none"],
  ["double only", "double blocks only", "all", "none"],
  ["single only", "single blocks only", "none", "all"],
];

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function ranksText(node, dims) {
  const main = widget(node, "network_dim")?.value ?? 0;
  const ranks = dims.map(([name, label]) => [label, rankOf(widget(node, name)?.value ?? -1, main)]);
  const distinct = new Set(ranks.map(([, r]) => r));
  if (distinct.size === 1) {
    const r = ranks[0][1];
    return { text: r ? `rank ${r}` : "rank 0: no LoRA", any: r > 0, ranks };
  }
  return { text: ranks.map(([l, r]) => `${l} ${r || "off"}`).join(" · "), any: ranks.some(([, r]) => r > 0), ranks };
}

export class BlockPicker {
  /** @param node the network node; @param setWidget (node, name, value) => void, as a user's edit sets a widget;
   *  @param onChange called after the picker wrote the widgets */
  constructor(node, setWidget, onChange) {
    this.node = node;
    this.setWidget = setWidget;
    this.onChange = onChange;
    this.key = "";
    this.element = document.createElement("div");
    this.element.className = "flt-box flt-picker";
    this.presets = document.createElement("div");
    this.presets.className = "flt-picker-presets";
    this.rows = {};
    this.element.append(this.presets);
    for (const [kind, count] of [["double", DOUBLE_BLOCKS], ["single", SINGLE_BLOCKS]]) {
      const head = document.createElement("div");
      head.className = "flt-picker-head";
      const grid = document.createElement("div");
      grid.className = "flt-picker-grid";
      grid.dataset.kind = kind;
      const cells = [];
      for (let i = 0; i < count; i++) {
        const cell = document.createElement("div");
        cell.className = "flt-cell";
        cell.textContent = String(i);
        cell.dataset.kind = kind;
        cell.dataset.index = String(i);
        cells.push(cell);
        grid.append(cell);
      }
      this.rows[kind] = { head, grid, cells };
      this.element.append(head, grid);
    }
    this.foot = document.createElement("div");
    this.foot.className = "flt-picker-foot";
    this.element.append(this.foot);
    this._presetButtons();
    this._drag();
    this.render();
  }

  _presetButtons() {
    const options = widget(this.node, "block_preset")?.options?.values;
    const known = Array.isArray(options) ? options : Object.keys(BLOCK_PRESETS);
    const buttons = BUTTONS.filter(([, preset]) => preset === "custom" || known.includes(preset));
    for (const name of known) { // the node's other presets (ranges people use), by their own names
      if (name !== "custom" && BLOCK_PRESETS[name] && !buttons.some(([, p]) => p === name)) {
        buttons.push([name, name, ...BLOCK_PRESETS[name]]);
      }
    }
    for (const [label, preset, d, s] of buttons) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = label;
      b.dataset.preset = preset;
      b.dataset.double = d;
      b.dataset.single = s;
      b.title = preset === "custom" ? `double_blocks ${d}, single_blocks ${s}` : `block_preset '${preset}'`;
      b.addEventListener("click", (e) => {
        e.stopPropagation();
        this.write(preset, d, s);
      });
      this.presets.append(b);
    }
  }

  _drag() {
    let paint = null; // true: select, false: clear, null: not dragging
    const apply = (cell) => {
      const { kind, index } = cell.dataset;
      const sel = this.selection();
      const chosen = sel[kind].chosen.slice();
      if (chosen[Number(index)] === paint) return;
      chosen[Number(index)] = paint;
      const other = kind === "double" ? "single" : "double";
      const texts = { [kind]: formatBlockSelection(chosen), [other]: sel[`${other}Text`] }; // the other as it is
      this.write("custom", texts.double, texts.single);
    };
    const cellAt = (e) => {
      const el = document.elementFromPoint(e.clientX, e.clientY);
      return el && el.classList?.contains("flt-cell") && this.element.contains(el) ? el : null;
    };
    this.element.addEventListener("pointerdown", (e) => {
      const cell = e.target.closest?.(".flt-cell");
      if (!cell || e.button !== 0) return;
      e.preventDefault();
      e.stopPropagation();
      const sel = this.selection();
      paint = !sel[cell.dataset.kind].chosen[Number(cell.dataset.index)];
      apply(cell);
      const move = (ev) => {
        const c = cellAt(ev);
        if (c && paint !== null) apply(c);
      };
      const up = () => {
        paint = null;
        window.removeEventListener("pointermove", move, true);
        window.removeEventListener("pointerup", up, true);
        window.removeEventListener("pointercancel", up, true);
      };
      window.addEventListener("pointermove", move, true);
      window.addEventListener("pointerup", up, true);
      window.addEventListener("pointercancel", up, true);
    });
  }

  selection() {
    const n = this.node;
    return effectiveSelection(widget(n, "block_preset")?.value ?? "custom", widget(n, "double_blocks")?.value ?? "all",
                              widget(n, "single_blocks")?.value ?? "all");
  }

  /** set block_preset and the two text fields (each through its widget, so ComfyUI sees a change) */
  write(preset, doubleText, singleText) {
    const n = this.node;
    const set = (name, value) => {
      const w = widget(n, name);
      if (w && w.value !== value) this.setWidget(n, name, value);
    };
    const presetWidget = widget(n, "block_preset");
    this._writing = true;
    try {
      if (presetWidget && (presetWidget.options?.values ?? []).includes(preset)) set("block_preset", preset);
      else set("block_preset", "custom");
      set("double_blocks", doubleText);
      set("single_blocks", singleText);
    } finally {
      this._writing = false;
    }
    this.render();
    this.onChange?.();
  }

  /** the preset combo changed to a named preset: write its fields into the text widgets too */
  presetChosen(preset) {
    if (this._writing) return;
    const p = BLOCK_PRESETS[preset];
    if (p) this.write(preset, p[0], p[1]);
    else this.render();
  }

  stateKey() {
    const n = this.node;
    const names = ["block_preset", "double_blocks", "single_blocks", "train_blocks", "network_dim", "network_args",
                   ...DOUBLE_DIMS.map(([k]) => k), ...SINGLE_DIMS.map(([k]) => k)];
    return names.map((k) => String(widget(n, k)?.value)).join("\u0001");
  }

  /** redraw when a widget changed behind our back (typed text, a loaded workflow, another extension) */
  sync() {
    if (this.stateKey() !== this.key) this.render();
  }

  render() {
    this.key = this.stateKey();
    const n = this.node;
    const sel = this.selection();
    const trainBlocks = widget(n, "train_blocks")?.value ?? "all";
    const regDims = /(^|\n)\s*network_reg_dims\s*=/.test(String(widget(n, "network_args")?.value ?? ""));
    const info = { double: ranksText(n, DOUBLE_DIMS), single: ranksText(n, SINGLE_DIMS) };
    const counts = {};
    for (const kind of ["double", "single"]) {
      const { head, grid, cells } = this.rows[kind];
      const s = sel[kind];
      const excluded = (trainBlocks === "single" && kind === "double") || (trainBlocks === "double" && kind === "single");
      const active = !excluded && info[kind].any;
      grid.classList.toggle("flt-off", !active);
      counts[kind] = s.chosen.filter(Boolean).length;
      const why = excluded ? `train_blocks = ${trainBlocks}: no LoRA on ${kind} blocks`
        : !info[kind].any ? `every ${kind}-block rank is 0: no LoRA there` : info[kind].text;
      head.innerHTML = "";
      const title = document.createElement("b");
      title.textContent = `${kind} blocks ${counts[kind]}/${cells.length}`;
      const rank = document.createElement("span");
      rank.textContent = why + (active && regDims ? " (network_reg_dims may change some)" : "");
      rank.title = rank.textContent;
      head.append(title, rank);
      cells.forEach((cell, i) => {
        const on = s.chosen[i];
        cell.classList.toggle("flt-on", on);
        const ranks = info[kind].ranks.map(([l, r]) => `${l} ${r || "off"}`).join(", ");
        cell.title = `${kind} block ${i}: ${on && active ? `LoRA (${ranks})` : "no LoRA"}`;
      });
      grid.dataset.selection = formatBlockSelection(s.chosen);
    }
    for (const b of this.presets.children) {
      b.classList.toggle("flt-active", b.dataset.preset === (sel.preset ?? "custom") &&
        (sel.preset !== null || (b.dataset.double === formatBlockSelection(sel.double.chosen) &&
                                 b.dataset.single === formatBlockSelection(sel.single.chosen))));
    }
    const error = sel.double.error || sel.single.error;
    this.foot.classList.toggle("flt-error", Boolean(error));
    if (error) this.foot.textContent = error;
    else if (!counts.double && !counts.single) this.foot.textContent = "no block selected: the LoRA would have no block layers";
    else {
      this.foot.textContent = `double_blocks '${sel.doubleText}' · single_blocks '${sel.singleText}'` +
        (sel.preset ? ` (preset '${sel.preset}')` : "") + " · click or drag over blocks";
    }
    this.element.dataset.double = formatBlockSelection(sel.double.chosen);
    this.element.dataset.single = formatBlockSelection(sel.single.chosen);
    this.element.dataset.error = error || "";
  }
}
