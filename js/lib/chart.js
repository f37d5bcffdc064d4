// The loss chart: a canvas of our own (no chart library) with the loss per step, its moving average, the
// learning rate on a second axis and validation loss (dots) when the run validates; a status line (step/total, it/s,
// ETA) and the newest status message under it. The DOM element exposes what it shows as data attributes
// (data-points, data-last-step, data-total, data-state, data-prompt-id, data-lr-points, data-validation-points).

import { AVERAGE_WINDOW, formatDuration, formatNumber, movingAverage } from "./series.js";

const PAD = { left: 46, right: 50, top: 18, bottom: 16 };

function cssColor(el, name, fallback) {
  const v = getComputedStyle(el).getPropertyValue(name).trim();
  return v || fallback;
}

function luminance(color) {
  // "#rgb", "#rrggbb" or "rgb(r, g, b)" -> 0..1 (unknown: dark)
  let r; let g; let b;
  const hex = /^#([0-9a-f]{3}|[0-9a-f]{6})$/i.exec(color);
  if (hex) {
    const h = hex[1].length === 3 ? hex[1].split("").map((c) => c + c).join("") : hex[1];
    [r, g, b] = [0, 2, 4].map((i) => parseInt(h.slice(i, i + 2), 16));
  } else {
    const m = /rgba?\(\s*([\d.]+)[ ,]+([\d.]+)[ ,]+([\d.]+)/.exec(color);
    if (!m) return 0;
    [r, g, b] = [m[1], m[2], m[3]].map(Number);
  }
  return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255;
}

export function chartColors(el) {
  const background = cssColor(el, "--comfy-input-bg", "#222");
  const light = luminance(background) > 0.5;
  return {
    light,
    background,
    text: cssColor(el, "--fg-color", light ? "#222" : "#ddd"),
    muted: cssColor(el, "--descrip-text", "#999"),
    grid: cssColor(el, "--border-color", "#4e4e4e"),
    loss: light ? "rgba(25, 90, 190, 0.40)" : "rgba(120, 170, 255, 0.45)",
    average: light ? "#1450b0" : "#5ea2ff",
    lr: light ? "#b35400" : "#f0a040",
    validation: light ? "#12803a" : "#4cd07d",
  };
}

function niceTicks(lo, hi, count = 4) {
  const out = [];
  for (let i = 0; i <= count; i++) out.push(lo + ((hi - lo) * i) / count);
  return out;
}

function extent(values) {
  // a loop, not Math.min(...values): long runs would exceed the engine's argument limit
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v === null || !Number.isFinite(v)) continue;
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return lo <= hi ? [lo, hi] : null;
}

function range(values, pad = 0.06) {
  const found = extent(values);
  if (!found) return null;
  let [lo, hi] = found;
  if (hi - lo < 1e-12) {
    const d = Math.abs(lo) > 1e-12 ? Math.abs(lo) * 0.5 : 1;
    lo -= d; hi += d;
  } else {
    const d = (hi - lo) * pad;
    lo -= d; hi += d;
  }
  return [lo, hi];
}

/** draw `history` on `canvas` (sized to its CSS box) */
export function drawChart(canvas, history, colors) {
  const dpr = window.devicePixelRatio || 1;
  const width = Math.max(1, canvas.clientWidth);
  const height = Math.max(1, canvas.clientHeight);
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "middle";
  const left = PAD.left;
  const right = width - PAD.right;
  const top = PAD.top;
  const bottom = height - PAD.bottom;
  if (right - left < 20 || bottom - top < 20) return;

  const { steps, loss, lr, val } = history;
  const average = movingAverage(loss);
  const lossRange = range(loss.concat(val));
  const lrMax = Math.max(0, extent(lr)?.[1] ?? 0);

  // grid and axes
  ctx.strokeStyle = colors.grid;
  ctx.lineWidth = 1;
  for (const t of niceTicks(0, 1)) {
    const y = Math.round(bottom - (bottom - top) * t) + 0.5;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(right, y); ctx.stroke();
  }
  if (!steps.length || !lossRange) {
    ctx.fillStyle = colors.muted;
    ctx.textAlign = "center";
    ctx.fillText(history.state === "running" ? "waiting for the first step…" : "no training steps yet",
                 (left + right) / 2, (top + bottom) / 2);
    return;
  }
  const first = steps[0];
  const last = Math.max(steps[steps.length - 1], history.total || 0, first + 1);
  const x = (s) => left + ((right - left) * (s - first)) / (last - first);
  const [lo, hi] = lossRange;
  const y = (v) => bottom - ((bottom - top) * (v - lo)) / (hi - lo);
  const yLr = (v) => bottom - ((bottom - top) * v) / (lrMax * 1.08 || 1);

  // axis labels: loss on the left, lr on the right, steps below
  ctx.fillStyle = colors.muted;
  ctx.textAlign = "right";
  for (const t of niceTicks(lo, hi)) ctx.fillText(formatNumber(t, 3), left - 4, y(t));
  if (lrMax > 0) {
    ctx.textAlign = "left";
    ctx.fillStyle = colors.lr;
    for (const t of [0, lrMax / 2, lrMax]) ctx.fillText(t === 0 ? "0" : t.toExponential(1), right + 4, yLr(t));
  }
  ctx.fillStyle = colors.muted;
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  ctx.fillText(`step ${first}`, left, bottom + 3);
  ctx.textAlign = "right";
  ctx.fillText(`${last}`, right, bottom + 3);
  ctx.textBaseline = "middle";

  // joinGaps: a sparse series (validation) is drawn through its points, every one of them, nulls skipped
  const line = (values, toY, color, widthPx, dash, joinGaps = false) => {
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top - 2, right - left, bottom - top + 4);
    ctx.clip();
    ctx.strokeStyle = color;
    ctx.lineWidth = widthPx;
    ctx.setLineDash(dash || []);
    ctx.lineJoin = "round";
    let open = false;
    let drawn = 0;
    const stride = joinGaps ? 1 : Math.max(1, Math.floor(values.length / ((right - left) * 2)));
    for (let i = 0; i < values.length; i += (i + stride < values.length ? stride : 1)) {
      const v = values[i];
      if (v === null || !Number.isFinite(v)) { open = open && joinGaps; continue; }
      if (!open) { ctx.moveTo(x(steps[i]), toY(v)); open = true; } else ctx.lineTo(x(steps[i]), toY(v));
      drawn++;
      if (i === values.length - 1) break;
    }
    ctx.stroke();
    if (drawn === 1) { // a single point: a dot
      const i = values.findIndex((v) => v !== null && Number.isFinite(v));
      ctx.fillStyle = color;
      ctx.beginPath(); ctx.arc(x(steps[i]), toY(values[i]), 2.5, 0, Math.PI * 2); ctx.fill();
    }
    ctx.restore();
  };
  if (lrMax > 0) line(lr, yLr, colors.lr, 1.25, [4, 3]);
  line(loss, y, colors.loss, 1);
  line(average, y, colors.average, 2);
  const hasVal = val.some((v) => v !== null && Number.isFinite(v));
  if (hasVal) {
    line(val, y, colors.validation, 1.5, [], true);
    ctx.fillStyle = colors.validation;
    val.forEach((v, i) => {
      if (v === null || !Number.isFinite(v)) return;
      ctx.beginPath(); ctx.arc(x(steps[i]), y(v), 2.5, 0, Math.PI * 2); ctx.fill();
    });
  }

  // legend
  const legend = [["loss", colors.loss], [`avg ${AVERAGE_WINDOW}`, colors.average]];
  if (lrMax > 0) legend.push(["lr", colors.lr]);
  if (hasVal) legend.push(["validation", colors.validation]);
  let lx = left;
  ctx.textAlign = "left";
  for (const [label, color] of legend) {
    ctx.fillStyle = color;
    ctx.fillRect(lx, 6, 10, 3);
    ctx.fillStyle = colors.text;
    ctx.fillText(label, lx + 13, 8);
    lx += 20 + ctx.measureText(label).width;
  }
}

/** the DOM element and the state behind it; `update()` redraws from `history` */
export class LossChart {
  constructor(history) {
    this.history = history;
    this.rate = []; // [step, seconds] of the newest step events, for it/s
    this.element = document.createElement("div");
    this.element.className = "flt-box flt-chart";
    this.canvas = document.createElement("canvas");
    this.canvas.className = "flt-chart-canvas";
    this.status = document.createElement("div");
    this.status.className = "flt-chart-status";
    this.values = document.createElement("div");
    this.values.className = "flt-chart-status flt-chart-values";
    this.message = document.createElement("div");
    this.message.className = "flt-chart-message";
    this.element.append(this.canvas, this.status, this.values, this.message);
    this._frame = null;
    if (typeof ResizeObserver !== "undefined") {
      this._observer = new ResizeObserver(() => this.schedule());
      this._observer.observe(this.canvas);
    }
  }

  setHistory(history) {
    this.history = history;
    this.rate = [];
    this.update();
  }

  noteStep(step) {
    const now = performance.now() / 1000;
    if (this.rate.length && step <= this.rate[this.rate.length - 1][0]) this.rate = [];
    this.rate.push([step, now]);
    if (this.rate.length > 20) this.rate.shift();
  }

  itPerSecond() {
    if (this.rate.length >= 2) {
      const [s0, t0] = this.rate[0];
      const [s1, t1] = this.rate[this.rate.length - 1];
      if (t1 > t0) return (s1 - s0) / (t1 - t0);
    }
    const h = this.history;
    const step = h.steps[h.steps.length - 1];
    if (h.eta > 0 && h.total > step) return (h.total - step) / h.eta;
    return null;
  }

  /** [progress line, values line] */
  statusLines() {
    const h = this.history;
    const n = h.steps.length;
    if (!n) {
      return [h.state === "running" ? "starting…" : "no training run yet: the chart fills while the train node runs", ""];
    }
    const step = h.steps[n - 1];
    const total = h.total || step;
    const progress = [];
    if (h.state === "finished") progress.push(`finished: ${step} steps`);
    else if (h.state === "running") progress.push(`step ${step}/${total} (${Math.floor((100 * step) / total)}%)`);
    else progress.push(`${h.state === "idle" ? "" : `${h.state} at `}step ${step}/${total}`.trim());
    if (h.state === "running") {
      const rate = this.itPerSecond();
      if (rate) progress.push(rate >= 1 ? `${rate.toFixed(2)} it/s` : `${(1 / rate).toFixed(2)} s/it`);
      progress.push(`ETA ${formatDuration(h.eta)}`);
    }
    if (h.epoch !== null && h.epoch !== undefined) progress.push(`epoch ${h.epoch}`);
    const values = [`loss ${formatNumber(h.loss[n - 1])}`, `avg ${formatNumber(movingAverage(h.loss)[n - 1])}`];
    const lrNow = h.lr[n - 1];
    if (lrNow !== null && lrNow !== undefined) values.push(`lr ${Number(lrNow).toExponential(2)}`);
    const lastVal = [...h.val].reverse().find((v) => v !== null && Number.isFinite(v));
    if (lastVal !== undefined) values.push(`validation ${formatNumber(lastVal)}`);
    return [progress.join(" · "), values.join(" · ")];
  }

  schedule() {
    if (this._frame !== null) return;
    this._frame = requestAnimationFrame(() => {
      this._frame = null;
      this.draw();
    });
  }

  update() {
    const h = this.history;
    const d = this.element.dataset;
    d.points = String(h.steps.length);
    d.lastStep = String(h.steps.length ? h.steps[h.steps.length - 1] : 0);
    d.total = String(h.total || 0);
    d.state = h.state;
    d.promptId = h.prompt_id || "";
    d.lrPoints = String(h.lr.filter((v) => v !== null && Number.isFinite(v)).length);
    d.validationPoints = String(h.val.filter((v) => v !== null && Number.isFinite(v)).length);
    const [progress, values] = this.statusLines();
    this.status.textContent = progress;
    this.status.title = progress;
    this.values.textContent = values;
    this.values.title = values;
    this.message.textContent = h.message || "";
    this.message.title = h.message || "";
    this.message.classList.toggle("flt-warning", /^(warning|error)\b/.test(h.message || ""));
    this.schedule();
  }

  draw() {
    if (!this.element.isConnected) return;
    drawChart(this.canvas, this.history, chartColors(this.element));
  }
}
