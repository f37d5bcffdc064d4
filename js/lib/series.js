// The loss chart's data: steps with loss, lr and validation loss; the train node's websocket messages
// (js/event_schema.js) applied to it; the moving average the train node's loss_curve image draws (nodes/images.py
// moving_average, 50 steps); thinning for storage in the node's properties. Pure functions, no ComfyUI imports.

export const AVERAGE_WINDOW = 50;
export const MAX_STORED_POINTS = 2000; // a saved workflow keeps about this many steps (evenly thinned)

export function emptyHistory() {
  return { prompt_id: null, steps: [], loss: [], lr: [], val: [], total: 0, eta: null, epoch: null,
           state: "idle", message: "" };
}

/** a stored history (from node properties) -> a well-formed one; anything unreadable -> empty */
export function readHistory(raw) {
  const h = emptyHistory();
  if (!raw || typeof raw !== "object") return h;
  const n = Array.isArray(raw.steps) ? raw.steps.length : 0;
  const col = (a) => (Array.isArray(a) && a.length === n ? a.map((v) => (v === null ? null : Number(v))) : new Array(n).fill(null));
  h.steps = n ? raw.steps.map(Number) : [];
  h.loss = col(raw.loss);
  h.lr = col(raw.lr);
  h.val = col(raw.val);
  for (const key of ["prompt_id", "total", "eta", "epoch", "state", "message"]) {
    if (raw[key] !== undefined) h[key] = raw[key];
  }
  if (h.state === "running") h.state = "stopped"; // a reloaded page can't know; live events set it again
  return h;
}

export function movingAverage(values, window = AVERAGE_WINDOW) {
  const out = [];
  let total = 0;
  let count = 0;
  const finite = values.map((v) => (v === null || !Number.isFinite(v) ? null : v));
  for (let i = 0; i < finite.length; i++) {
    if (finite[i] !== null) { total += finite[i]; count++; }
    if (i >= window && finite[i - window] !== null) { total -= finite[i - window]; count--; }
    out.push(count ? total / count : null);
  }
  return out;
}

/** a message of another prompt id starts a new run: the history is reset; returns whether it was */
function startRun(history, promptId) {
  if (!promptId || promptId === history.prompt_id) return false;
  Object.assign(history, emptyHistory(), { prompt_id: promptId, state: "running" });
  return true;
}

/** the row of `step` (inserted in order, without values, when it has none) */
function rowOf(history, step) {
  const n = history.steps.length;
  const at = n && step <= history.steps[n - 1] ? history.steps.lastIndexOf(step) : -1; // usually the next step
  if (at >= 0) return at;
  let i = n;
  while (i > 0 && history.steps[i - 1] > step) i--;
  history.steps.splice(i, 0, step);
  history.loss.splice(i, 0, null);
  history.lr.splice(i, 0, null);
  history.val.splice(i, 0, null);
  return i;
}

const number = (v) => (v === null || v === undefined ? null : Number(v));

/** one `step` message; returns true when it started a new run (the history was reset) */
export function addStep(history, event) {
  const reset = startRun(history, event.prompt_id);
  const i = rowOf(history, Number(event.step));
  history.loss[i] = number(event.loss);
  history.lr[i] = number(event.lr);
  history.total = Number(event.total) || history.total;
  history.eta = event.eta_seconds ?? null;
  history.epoch = event.epoch ?? history.epoch;
  history.state = "running";
  return reset;
}

/** one `validation` message: the held-out loss at its step; returns true when it started a new run */
export function addValidation(history, event) {
  const reset = startRun(history, event.prompt_id);
  history.val[rowOf(history, Number(event.step))] = number(event.loss);
  return reset;
}

const fileName = (path) => String(path).split(/[\\/]/).pop();

/** the status line of a `phase`, `status`, `previews`, `saved` or `finished` message */
export function statusText(type, d) {
  switch (type) {
    case "phase": return d.total > 0 ? `${d.phase} ${d.done}/${d.total}` : d.phase;
    case "status": return d.level !== "info" ? `${d.level}: ${d.text}` : d.text;
    case "previews": return `previews at step ${d.step}`;
    case "saved": return `saved ${d.kind}: ${fileName(d.path)}`;
    case "finished": return d.stopped_early ? "stopped" : "finished";
    default: return null;
  }
}

/** any chart message (EVENTS' types but memory_plan) -> the history; returns true when it started a new run */
export function applyMessage(history, type, detail) {
  if (type === "step") return addStep(history, detail);
  if (type === "validation") return addValidation(history, detail);
  const reset = startRun(history, detail.prompt_id);
  history.message = statusText(type, detail) ?? history.message;
  if (type === "finished") history.state = detail.stopped_early ? "stopped" : "finished";
  return reset;
}

/** the node's executed output: the loss of every step of the run (a resumed run's earlier steps included) */
export function setLosses(history, losses) {
  const lrByStep = new Map(history.steps.map((s, i) => [s, history.lr[i]]));
  const valByStep = new Map(history.steps.map((s, i) => [s, history.val[i]]));
  history.steps = losses.map((_, i) => i + 1);
  history.loss = losses.map((v) => (v === null ? null : Number(v)));
  history.lr = history.steps.map((s) => lrByStep.get(s) ?? null);
  history.val = history.steps.map((s) => valByStep.get(s) ?? null);
  history.total = Math.max(history.total || 0, losses.length);
  history.state = "finished";
  history.eta = 0;
}

/** a copy for the node's properties: at most `max` steps, evenly thinned, the last step always kept */
export function thinned(history, max = MAX_STORED_POINTS) {
  const n = history.steps.length;
  const copy = { ...history, steps: history.steps.slice(), loss: history.loss.slice(), lr: history.lr.slice(),
                 val: history.val.slice() };
  if (n <= max) return copy;
  const keep = [];
  const stride = n / max;
  for (let k = 0; k < max - 1; k++) keep.push(Math.floor(k * stride));
  keep.push(n - 1);
  for (const key of ["steps", "loss", "lr", "val"]) copy[key] = keep.map((i) => history[key][i]);
  // validation points are rare: keep every one of them
  history.val.forEach((v, i) => {
    if (v !== null && !keep.includes(i)) {
      let j = copy.steps.findIndex((s) => s > history.steps[i]);
      if (j < 0) j = copy.steps.length;
      copy.steps.splice(j, 0, history.steps[i]); copy.loss.splice(j, 0, history.loss[i]);
      copy.lr.splice(j, 0, history.lr[i]); copy.val.splice(j, 0, v);
    }
  });
  return copy;
}

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

export function formatNumber(v, digits = 4) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(Math.max(0, digits - 3));
  return Number(v.toPrecision(digits)).toString();
}
