// Building the page from data without ever parsing data as markup: every value goes in
// through textContent, a text node or an attribute, never an HTML parser. Device ids, names,
// metadata, telemetry and command results all come from devices or their operators.

/** An element: `h('td', {class: 'x'}, 'text', child)`; strings become text nodes. */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  setProps(el, props);
  add(el, children);
  return el;
}

/** An SVG element (attributes only; text through children). */
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  }
  add(el, children);
  return el;
}

const PROPERTIES = new Set(['value', 'checked', 'disabled', 'selected', 'hidden', 'type']);

function setProps(el, props) {
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (PROPERTIES.has(k)) el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
}

function add(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
}

/** Replaces the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  add(el, children);
  return el;
}

/** Any JSON value as short text: strings as they are, the rest as JSON. */
export function valueText(v) {
  if (typeof v === 'string') return v;
  if (v === undefined) return '';
  return JSON.stringify(v);
}

/** JSON, indented, for `<pre>`. */
export function pretty(v) {
  return JSON.stringify(v, null, 2);
}

/** `12:03:04` today, `2026-11-24 12:03:04` on other days; '' for null. */
export function clock(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const pad = (n) => String(n).padStart(2, '0');
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  const today = new Date();
  if (d.toDateString() === today.toDateString()) return time;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
}

/** "just now", "3 s ago", "5 min ago", "2 h ago", "4 d ago". */
export function ago(iso, now = Date.now()) {
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return '';
  const s = Math.max(0, Math.round((now - t) / 1000));
  if (s < 2) return 'just now';
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

/** A `<time>` that keeps saying how long ago `iso` was (see `tickRelativeTimes`). */
export function relTime(iso, empty = 'never') {
  if (!iso) return h('span', { class: 'muted' }, empty);
  return h('time', { datetime: iso, title: clock(iso), dataset: { rel: '' } }, ago(iso));
}

/** Refreshes every relative time on the page once a second. */
export function tickRelativeTimes() {
  setInterval(() => {
    const now = Date.now();
    for (const t of document.querySelectorAll('time[data-rel]')) {
      t.textContent = ago(t.getAttribute('datetime'), now);
    }
  }, 1000);
}

/** A status pill: `pill(text, 'ok' | 'bad' | 'warn' | 'muted' | 'info')`. */
export function pill(text, tone = 'muted') {
  return h('span', { class: `pill pill-${tone}` }, text);
}

/** The tone of a command status. */
export function statusTone(status) {
  switch (status) {
    case 'succeeded': return 'ok';
    case 'failed': case 'rejected': case 'expired': case 'timed_out': return 'bad';
    case 'canceled': return 'muted';
    case 'queued': return 'muted';
    default: return 'info';
  }
}

/** A card: a titled box, with optional controls on the right of the title. */
export function card(title, controls, ...body) {
  return h('section', { class: 'card' },
    h('div', { class: 'card-head' }, h('h2', {}, title), controls ?? null),
    h('div', { class: 'card-body' }, ...body));
}

/** An `<input>` with its `<label>`. */
export function field(label, input, hint) {
  return h('label', { class: 'field' }, h('span', { class: 'field-label' }, label), input,
    hint ? h('span', { class: 'field-hint' }, hint) : null);
}

/** Random hex, from the browser's CSPRNG (works outside secure contexts too). */
export function randomHex(bytes = 8) {
  const a = crypto.getRandomValues(new Uint8Array(bytes));
  return Array.from(a, (b) => b.toString(16).padStart(2, '0')).join('');
}
