// The pack's CSS, added once to the page. Colours come from the CSS variables ComfyUI's colour palettes set
// (--fg-color, --descrip-text, --border-color, --comfy-input-bg, --error-text), so light and dark themes both work.

const STYLE_ID = "flux-lora-trainer-style";

const CSS = `
.flt-box { box-sizing: border-box; width: 100%; height: 100%; font: 11px/1.35 sans-serif; color: var(--fg-color);
  display: flex; flex-direction: column; gap: 3px; overflow: hidden; }
.flt-chart-canvas { flex: 1 1 auto; width: 100%; min-height: 60px; display: block; border-radius: 4px;
  background: var(--comfy-input-bg); border: 1px solid var(--border-color); box-sizing: border-box; }
.flt-chart-status { flex: 0 0 auto; min-height: 1.35em; white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
  font-variant-numeric: tabular-nums; }
.flt-chart-message { flex: 0 0 auto; color: var(--descrip-text); white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; min-height: 1.35em; }
.flt-chart-message.flt-warning { color: var(--error-text); }
.flt-status { box-sizing: border-box; width: 100%; height: 100%; margin: 0; padding: 4px 6px; overflow: auto;
  font: 11px/1.35 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre-wrap;
  word-break: break-word; color: var(--input-text, var(--fg-color)); background: var(--comfy-input-bg);
  border: 1px solid var(--border-color); border-radius: 4px; user-select: text; }
.flt-picker { user-select: none; }
.flt-picker-presets { display: flex; flex-wrap: wrap; gap: 3px; }
.flt-picker-presets button { font: 10px sans-serif; padding: 1px 6px; border-radius: 8px; cursor: pointer;
  color: var(--fg-color); background: var(--comfy-input-bg); border: 1px solid var(--border-color); }
.flt-picker-presets button:hover { border-color: var(--fg-color); }
.flt-picker-presets button.flt-active { background: var(--flt-accent); border-color: var(--flt-accent);
  color: #fff; }
.flt-picker-head { display: flex; justify-content: space-between; gap: 6px; color: var(--descrip-text);
  white-space: nowrap; overflow: hidden; }
.flt-picker-head b { color: var(--fg-color); font-weight: 600; }
.flt-picker-head span:last-child { overflow: hidden; text-overflow: ellipsis; }
.flt-picker-grid { display: grid; grid-template-columns: repeat(19, 1fr); gap: 2px; touch-action: none; }
.flt-picker-grid.flt-off { opacity: 0.4; }
.flt-cell { height: 15px; border-radius: 2px; font: 9px/15px sans-serif; text-align: center; cursor: pointer;
  color: var(--descrip-text); background: var(--comfy-input-bg); border: 1px solid var(--border-color);
  box-sizing: border-box; overflow: hidden; }
.flt-cell.flt-on { background: var(--flt-accent); border-color: var(--flt-accent); color: #fff; }
.flt-picker-foot { color: var(--descrip-text); white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.flt-picker-foot.flt-error { color: var(--error-text); white-space: normal; }
.flt-box { --flt-accent: #3b7fd9; }
`;

export function addStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  document.head.appendChild(style);
}
