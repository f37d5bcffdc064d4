// The loss chart's data: steps with loss, lr and (when the events carry it) validation loss; the moving average
// the train node's loss_curve image draws (nodes/images.py moving_average, 50 steps); thinning for storage in the
// node's properties. Pure functions, no ComfyUI imports.

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

/** add one step event; returns true when it started a new run (the history was reset) */
export function addStep(history, event) {
  let reset = false;
  if (event.prompt_id && event.prompt_id !== history.prompt_id) {
    Object.assign(history, emptyHistory(), { prompt_id: event.prompt_id });
    reset = true;
  }
  const step = Number(event.step);
  const n = history.steps.length;
  const at = n && step <= history.steps[n - 1] ? history.steps.lastIndexOf(step) : -1; // usually the next step
  const val = typeof event.validation_loss === "number" ? event.validation_loss : null;
  const row = [Number(event.loss), event.lr === null || event.lr === undefined ? null : Number(event.lr), val];
  if (at >= 0) {
    history.loss[at] = row[0]; history.lr[at] = row[1]; if (val !== null) history.val[at] = val;
  } else {
    let i = history.steps.length;
    while (i > 0 && history.steps[i - 1] > step) i--;
    history.steps.splice(i, 0, step);
    history.loss.splice(i, 0, row[0]);
    history.lr.splice(i, 0, row[1]);
    history.val.splice(i, 0, val);
  }
  history.total = Number(event.total) || history.total;
  history.eta = event.eta_seconds ?? null;
  history.epoch = event.epoch ?? history.epoch;
  history.state = "running";
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
