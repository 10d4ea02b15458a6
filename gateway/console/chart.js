// A live line chart of one numeric telemetry key over the last minutes, drawn as SVG.
// `data-points` on the chart element says how many points it holds, `data-live` how many
// of them came from the event stream (as opposed to the query that seeded it).

import { h, svg } from './dom.js';

const HEIGHT = 260;
const PAD = { left: 52, right: 18, top: 16, bottom: 28 };

export class LiveChart {
  constructor(windowMs) {
    this.windowMs = windowMs;
    this.points = []; // {t: epoch ms, v: number}, oldest first
    this.live = 0;
    this.key = '';
    this.svg = svg('svg', { class: 'chart-svg', height: HEIGHT, role: 'img' });
    this.readout = h('div', { class: 'chart-readout' });
    this.el = h('div', { class: 'chart', id: 'chart', dataset: { points: '0', live: '0' } }, this.svg, this.readout);
    this.frame = 0;
    this.timer = setInterval(() => this.schedule(), 1000); // keeps the time axis moving
  }

  destroy() {
    clearInterval(this.timer);
    cancelAnimationFrame(this.frame);
  }

  /** Starts over with `points` for `key` (from the telemetry query). */
  reset(key, points) {
    this.key = key;
    this.points = points.slice().sort((a, b) => a.t - b.t);
    this.live = 0;
    this.trim();
    this.schedule();
  }

  setWindow(ms) {
    this.windowMs = ms;
    this.schedule();
  }

  /** One point from the event stream. */
  add(t, v) {
    if (!Number.isFinite(t) || !Number.isFinite(v)) return;
    const p = { t, v };
    const last = this.points[this.points.length - 1];
    if (!last || last.t <= t) {
      this.points.push(p);
    } else {
      const i = this.points.findIndex((q) => q.t > t);
      this.points.splice(i, 0, p);
    }
    this.live += 1;
    this.trim();
    this.schedule();
  }

  trim() {
    // Keep an hour at most, whatever the window shows.
    const oldest = Date.now() - 3600_000;
    let i = 0;
    while (i < this.points.length && this.points[i].t < oldest) i += 1;
    if (i) this.points.splice(0, i);
  }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  draw() {
    const now = Date.now();
    const from = now - this.windowMs;
    const visible = this.points.filter((p) => p.t >= from && p.t <= now + 5000);
    this.el.dataset.points = String(visible.length);
    this.el.dataset.live = String(this.live);
    this.el.dataset.key = this.key;
    const width = Math.max(320, Math.round(this.svg.getBoundingClientRect().width) || 720);
    this.svg.setAttribute('viewBox', `0 0 ${width} ${HEIGHT}`);
    this.svg.setAttribute('aria-label', `${this.key} over the last ${Math.round(this.windowMs / 60000)} minutes`);
    const plotW = width - PAD.left - PAD.right;
    const plotH = HEIGHT - PAD.top - PAD.bottom;
    const x = (t) => PAD.left + ((t - from) / this.windowMs) * plotW;

    let lo = Math.min(...visible.map((p) => p.v));
    let hi = Math.max(...visible.map((p) => p.v));
    if (!visible.length) { lo = 0; hi = 1; }
    if (hi - lo < 1e-9) { lo -= 1; hi += 1; }
    // Round ticks (1, 2 or 5 times a power of ten) that enclose the data.
    const tick = niceStep((hi - lo) / 4);
    lo = Math.floor(lo / tick) * tick;
    hi = Math.ceil(hi / tick) * tick;
    const y = (v) => PAD.top + (1 - (v - lo) / (hi - lo)) * plotH;

    const parts = [];
    const decimals = Math.max(0, -Math.floor(Math.log10(tick) + 1e-9));
    for (let v = lo; v <= hi + tick / 2; v += tick) {
      const yy = y(v);
      parts.push(svg('line', { class: 'grid', x1: PAD.left, x2: width - PAD.right, y1: yy, y2: yy }));
      parts.push(svg('text', { class: 'axis', x: PAD.left - 8, y: yy + 4, 'text-anchor': 'end' }, v.toFixed(decimals)));
    }
    const step = tickStep(this.windowMs);
    for (let t = Math.ceil(from / step) * step; t <= now; t += step) {
      const xx = x(t);
      if (xx < PAD.left + 16) continue; // its label would run into the value axis
      parts.push(svg('line', { class: 'grid grid-v', x1: xx, x2: xx, y1: PAD.top, y2: HEIGHT - PAD.bottom }));
      parts.push(svg('text', { class: 'axis', x: xx, y: HEIGHT - 8, 'text-anchor': 'middle' }, hhmmss(t, step)));
    }
    if (visible.length) {
      const line = visible.map((p, i) => `${i ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join('');
      const base = HEIGHT - PAD.bottom;
      const first = visible[0];
      const last = visible[visible.length - 1];
      parts.push(svg('path', { class: 'area', d: `${line}L${x(last.t).toFixed(1)},${base}L${x(first.t).toFixed(1)},${base}Z` }));
      parts.push(svg('path', { class: 'line', d: line }));
      parts.push(svg('circle', { class: 'dot', cx: x(last.t), cy: y(last.v), r: 4 }));
      this.readout.replaceChildren(
        h('span', { class: 'readout-key' }, this.key), ' ',
        h('strong', { class: 'readout-value' }, String(last.v)),
        h('span', { class: 'muted' }, ` · ${visible.length} points in view`));
    } else {
      parts.push(svg('text', { class: 'chart-empty', x: PAD.left + plotW / 2, y: PAD.top + plotH / 2, 'text-anchor': 'middle' },
        this.key ? `Waiting for readings of ${this.key}…` : 'No numeric telemetry key yet'));
      this.readout.replaceChildren(h('span', { class: 'muted' }, 'No points in view'));
    }
    this.svg.replaceChildren(...parts);
  }
}

function tickStep(windowMs) {
  const minutes = windowMs / 60000;
  if (minutes <= 1) return 10_000;
  if (minutes <= 5) return 60_000;
  if (minutes <= 15) return 180_000;
  return 600_000;
}

function hhmmss(t, step) {
  const d = new Date(t);
  const pad = (n) => String(n).padStart(2, '0');
  const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  return step < 60_000 ? `${hm}:${pad(d.getSeconds())}` : hm;
}

function niceStep(raw) {
  const power = 10 ** Math.floor(Math.log10(raw));
  const f = raw / power;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * power;
}
