// Block selection text <-> per-block booleans, exactly as the core reads it (trainer/config/lora.py
// parse_block_selection): 'all', 'none' (or ''), or comma-separated indices and inclusive ranges '0,1,8-12,18'.
// Pure functions, no ComfyUI imports: tests/test_browser.py imports this module in the page and compares it with
// the Python function on a table of inputs.

export const DOUBLE_BLOCKS = 19; // FLUX.1 dev/schnell
export const SINGLE_BLOCKS = 38;

// nodes/translate.py BLOCK_PRESETS: the network node's block_preset combo (null: 'custom' uses the two fields)
export const BLOCK_PRESETS = {
  custom: null,
  all: ["all", "all"],
  "double blocks only": ["all", "none"],
  "single blocks only": ["none", "all"],
  "single 10-20": ["none", "10-20"],
  "double 0-9 + single 0-18": ["0-9", "0-18"],
};

// per-layer-type rank widgets of the network node (trainer/config/lora.py TYPE_DIM_OPTIONS) by block kind
export const DOUBLE_DIMS = [
  ["img_attn_dim", "img attn"], ["txt_attn_dim", "txt attn"], ["img_mlp_dim", "img mlp"],
  ["txt_mlp_dim", "txt mlp"], ["img_mod_dim", "img mod"], ["txt_mod_dim", "txt mod"],
];
export const SINGLE_DIMS = [["single_dim", "linear1/2"], ["single_mod_dim", "mod"]];

/**
 * @param {string} selection the widget text
 * @param {number} count blocks of that kind
 * @param {string} option the option name used in messages
 * @param {boolean} checkRange indices past the last block are an error (the core checks them when it trains)
 * @returns {{chosen: boolean[], error: string|null}} chosen is all false when there is an error
 */
export function parseBlockSelection(selection, count, option = "blocks", checkRange = true) {
  const text = String(selection ?? "").trim().toLowerCase();
  if (text === "all") return { chosen: new Array(count).fill(true), error: null };
  if (text === "none" || text === "") return { chosen: new Array(count).fill(false), error: null };
  const chosen = new Array(count).fill(false);
  const fail = (error) => ({ chosen: new Array(count).fill(false), error });
  for (const raw of text.split(",")) {
    const part = raw.trim();
    const match = /^(\d+)(?:\s*-\s*(\d+))?$/.exec(part);
    if (!match) {
      return fail(`${option}: '${part}' in '${selection}' is not an index or a range like 8-12; ` +
                  "expected e.g. '0,1,8-12,18', 'all' or 'none'");
    }
    const start = parseInt(match[1], 10);
    const end = match[2] === undefined ? start : parseInt(match[2], 10);
    if (start > end) return fail(`${option}: range '${part}' runs backwards`);
    if (checkRange && end >= count) {
      return fail(`${option}: index ${end} is out of range; this model's blocks are 0-${count - 1}`);
    }
    for (let i = start; i <= Math.min(end, count - 1); i++) chosen[i] = true;
  }
  return { chosen, error: null };
}

/** booleans -> the shortest text in the same syntax: 'all', 'none' or '0-5,10' (runs of two or more as ranges) */
export function formatBlockSelection(chosen) {
  if (chosen.length && chosen.every(Boolean)) return "all";
  if (!chosen.some(Boolean)) return "none";
  const parts = [];
  for (let i = 0; i < chosen.length; i++) {
    if (!chosen[i]) continue;
    let j = i;
    while (j + 1 < chosen.length && chosen[j + 1]) j++;
    parts.push(j > i ? `${i}-${j}` : `${i}`);
    i = j;
  }
  return parts.join(",");
}

/** what the core trains for these widget values: the preset's fields unless it is 'custom' */
export function effectiveSelection(preset, doubleText, singleText) {
  const fromPreset = BLOCK_PRESETS[preset];
  const [d, s] = fromPreset ? fromPreset : [doubleText, singleText];
  return {
    double: parseBlockSelection(d, DOUBLE_BLOCKS, "double_blocks"),
    single: parseBlockSelection(s, SINGLE_BLOCKS, "single_blocks"),
    doubleText: d,
    singleText: s,
    preset: fromPreset ? preset : null,
  };
}

/** a rank widget's value -> the rank used (-1: the main rank, 0: no LoRA), as nodes/translate.py network_fields */
export function rankOf(value, networkDim) {
  const v = Number(value);
  return v === undefined || Number.isNaN(v) || v < 0 ? Number(networkDim) : v;
}
