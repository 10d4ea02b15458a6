// One device: its presence, latest values, a live chart, commands (sent from here too, and
// followed live from queued to their outcome) and connection history.

import { ApiError, call, get, query, seg } from './api.js';
import { LiveChart } from './chart.js';
import { card, clock, field, fill, h, pill, pretty, randomHex, relTime, statusTone, valueText } from './dom.js';
import { EventStream } from './events.js';

const FINAL = new Set(['succeeded', 'failed', 'rejected', 'expired', 'timed_out', 'canceled']);
const WINDOWS = [[1, '1 min'], [5, '5 min'], [15, '15 min'], [60, '1 h']];
const COMMAND_NAMES = ['ping', 'set_interval', 'reboot', 'fail'];

/** How far along a command is: a later report never moves it back. */
function rank(c) {
  if (FINAL.has(c.status)) return 3;
  return { queued: 0, sent: 1, delivered: 2 }[c.status] ?? 0;
}

/** Mounts the device view for `id` in `root`; returns its cleanup. */
export function mountDevice(root, id, { setStreamState }) {
  let device = null;
  let latest = null;
  let tracked = null; // the command sent from this page: {key, command}
  let seeding = null; // live points that arrived while the chart was being seeded
  let sessionsTimer = null;
  const commands = new Map();
  const commandRows = new Map();
  const chart = new LiveChart(5 * 60_000);

  const title = h('div', { class: 'device-title' });
  const info = h('dl', { class: 'info', id: 'device-info' });
  const latestBody = h('div', { id: 'latest-values' }, h('p', { class: 'muted' }, 'Loading…'));
  const keySelect = h('select', { id: 'chart-key', onchange: () => seedChart(keySelect.value) });
  const windowSelect = h('select', { id: 'chart-window', onchange: () => { chart.setWindow(Number(windowSelect.value) * 60_000); seedChart(chart.key); } },
    WINDOWS.map(([m, label]) => h('option', { value: String(m), selected: m === 5 }, label)));
  const commandsBody = h('tbody', { id: 'command-rows' });
  const sessionsBody = h('tbody', { id: 'session-rows' });
  const trackerBox = h('div', { id: 'command-tracker', class: 'tracker', hidden: true });

  const nameInput = h('input', { id: 'command-name', list: 'command-names', required: true, value: 'ping', autocomplete: 'off', spellcheck: 'false' });
  const paramsInput = h('textarea', { id: 'command-params', rows: 3, spellcheck: 'false' });
  paramsInput.value = '{}';
  const waitInput = h('input', { id: 'command-wait', type: 'number', min: 0, max: 60, value: '10' });
  const formError = h('p', { class: 'form-error', role: 'alert' });
  const sendButton = h('button', { class: 'btn btn-primary', type: 'submit', id: 'command-send' }, 'Send command');
  const form = h('form', { id: 'command-form', class: 'stack', onsubmit: (e) => { e.preventDefault(); sendCommand(); } },
    field('Name', nameInput),
    h('datalist', { id: 'command-names' }, COMMAND_NAMES.map((n) => h('option', { value: n }))),
    field('Parameters (a JSON object)', paramsInput),
    field('Wait for the outcome (seconds, 0 to 60)', waitInput),
    formError,
    h('div', {}, sendButton));

  fill(root,
    h('nav', { class: 'crumbs' }, h('a', { href: '#/' }, 'Fleet'), h('span', { class: 'muted' }, ' / '), h('span', {}, id)),
    h('div', { class: 'page-head' }, title),
    h('div', { class: 'card' }, info),
    h('div', { class: 'grid' },
      h('div', { class: 'stack' },
        card('Live chart', h('div', { class: 'toolbar' }, keySelect, windowSelect), chart.el),
        card('Latest values', null, latestBody)),
      h('div', { class: 'stack' },
        card('Send a command', null, form, trackerBox))),
    card('Commands', null, h('table', { class: 'table', id: 'commands-table' },
      h('thead', {}, h('tr', {}, h('th', {}, 'Command'), h('th', {}, 'Status'), h('th', {}, 'Created'),
        h('th', {}, 'Last change'), h('th', {}, 'Result'))),
      commandsBody)),
    card('Sessions', null, h('table', { class: 'table', id: 'sessions-table' },
      h('thead', {}, h('tr', {}, h('th', {}, 'Connected'), h('th', {}, 'Disconnected'), h('th', {}, 'Reason'),
        h('th', {}, 'Remote address'), h('th', {}, 'Auth'))),
      sessionsBody)));

  // --- the device and its presence

  function renderDevice() {
    const d = device;
    fill(title,
      h('h1', { id: 'device-id' }, d.id),
      d.online ? pill('online', 'ok') : pill('offline', 'muted'),
      d.enabled ? null : pill('disabled', 'bad'),
      d.name && d.name !== d.id ? h('span', { class: 'device-title-name muted', id: 'device-name' }, d.name) : null);
    title.dataset.online = String(Boolean(d.online));
    const row = (label, value) => [h('dt', {}, label), h('dd', {}, value)];
    const entries = Object.entries(d.metadata ?? {});
    const metadata = entries.length
      ? h('span', { class: 'metadata', id: 'device-metadata' }, entries.map(([k, v]) =>
        h('span', { class: 'chip' }, h('span', { class: 'muted' }, `${k}: `), valueText(v))))
      : h('span', { class: 'muted' }, 'none');
    fill(info,
      row('Name', d.name ?? h('span', { class: 'muted' }, 'none')),
      row('Last seen', relTime(d.last_seen_at)),
      row('Last connected', d.last_connected_at ? clock(d.last_connected_at) : h('span', { class: 'muted' }, 'never')),
      row('Last disconnect', d.last_disconnect_reason
        ? [h('span', { class: 'reason' }, d.last_disconnect_reason), ' ', h('span', { class: 'muted' }, clock(d.last_disconnected_at))]
        : h('span', { class: 'muted' }, 'none')),
      row('Created', clock(d.created_at)),
      row('Metadata', metadata));
  }

  // --- latest values and the chart

  function renderLatest() {
    if (!latest) {
      fill(latestBody, h('p', { class: 'muted' }, 'No telemetry yet.'));
      return;
    }
    const rows = Object.entries(latest.data ?? {}).map(([k, v]) =>
      h('tr', { dataset: { key: k } },
        h('th', { scope: 'row' }, k),
        h('td', { class: `value ${typeof v === 'number' ? 'num' : ''}` }, valueText(v))));
    fill(latestBody,
      h('table', { class: 'table table-kv' }, h('tbody', {}, rows)),
      h('p', { class: 'muted small' }, 'At ', clock(latest.ts), ' · message ', h('code', {}, latest.id)));
  }

  function numericKeys(data) {
    return Object.entries(data ?? {}).filter(([, v]) => typeof v === 'number').map(([k]) => k);
  }

  function updateKeyChoices() {
    const keys = numericKeys(latest?.data);
    const have = new Set(Array.from(keySelect.options, (o) => o.value));
    for (const k of keys) if (!have.has(k)) keySelect.append(h('option', { value: k }, k));
    if (!chart.key && keys.length) {
      const key = keys.includes('temp') ? 'temp' : keys[0];
      keySelect.value = key;
      seedChart(key);
    }
  }

  async function seedChart(key) {
    if (!key) return;
    const windowMs = Number(windowSelect.value) * 60_000;
    const from = new Date(Date.now() - windowMs).toISOString();
    const buffered = [];
    seeding = buffered;
    chart.reset(key, []);
    try {
      const page = await get(`/devices/${seg(id)}/telemetry${query({ keys: key, from, order: 'desc', limit: 1000 })}`);
      if (seeding !== buffered) return; // another key or window was chosen meanwhile
      const points = page.items
        .filter((it) => typeof it.data?.[key] === 'number')
        .map((it) => ({ t: Date.parse(it.ts), v: it.data[key] }));
      chart.reset(key, points);
      const seen = new Set(points.map((p) => p.t));
      for (const p of buffered) if (!seen.has(p.t)) chart.add(p.t, p.v);
    } catch (e) {
      console.warn('chart seed:', e.message);
    } finally {
      if (seeding === buffered) seeding = null;
    }
  }

  function onTelemetry(p) {
    if (!latest || p.ts >= latest.ts) {
      latest = { id: p.id, seq: p.seq, ts: p.ts, received_at: p.received_at, data: p.data };
      renderLatest();
      updateKeyChoices();
    }
    const v = p.data?.[chart.key];
    if (typeof v === 'number') {
      if (seeding) seeding.push({ t: Date.parse(p.ts), v });
      else chart.add(Date.parse(p.ts), v);
    }
    if (device && (!device.last_seen_at || p.received_at > device.last_seen_at)) {
      device.last_seen_at = p.received_at;
      renderDevice();
    }
  }

  // --- commands

  function commandRow(c) {
    const outcome = c.error != null
      ? h('span', { class: 'error-text' }, valueText(c.error))
      : c.result != null ? h('code', { class: 'result' }, valueText(c.result)) : h('span', { class: 'muted' }, '—');
    const last = c.completed_at ?? c.delivered_at ?? c.sent_at ?? c.created_at;
    return [
      h('td', {}, h('strong', {}, c.name), h('div', { class: 'muted small mono' }, c.id)),
      h('td', { class: 'status' }, pill(c.status, statusTone(c.status))),
      h('td', {}, clock(c.created_at)),
      h('td', {}, clock(last)),
      h('td', { class: 'outcome' }, outcome),
    ];
  }

  function upsertCommand(c, { prepend = true } = {}) {
    const old = commands.get(c.id);
    if (old && rank(old) > rank(c)) return;
    commands.set(c.id, c);
    commandsBody.querySelector('.placeholder')?.remove();
    let tr = commandRows.get(c.id);
    if (!tr) {
      tr = h('tr', { dataset: { commandId: c.id } });
      commandRows.set(c.id, tr);
      if (prepend) commandsBody.prepend(tr); else commandsBody.append(tr);
    }
    tr.dataset.status = c.status;
    fill(tr, commandRow(c));
    if (tracked && (c.id === tracked.command?.id || (c.idempotency_key && c.idempotency_key === tracked.key))) {
      if (!tracked.command || rank(c) >= rank(tracked.command)) {
        tracked.command = c;
        renderTracker();
      }
    }
  }

  function renderTracker(error) {
    trackerBox.hidden = false;
    const c = tracked.command;
    const status = error ? 'error' : c?.status ?? 'sending';
    trackerBox.dataset.status = status;
    if (c) trackerBox.dataset.commandId = c.id;
    const final = c && FINAL.has(c.status);
    const steps = [
      ['queued', c?.created_at],
      ['sent', c?.sent_at],
      ['delivered', c?.delivered_at],
      [final ? c.status : 'outcome', final ? c.completed_at ?? c.created_at : null],
    ];
    const reached = c ? rank(c) : -1;
    const stepEls = steps.map(([label, at], i) => {
      const done = Boolean(at) || i <= reached;
      const tone = i === 3 && final ? statusTone(c.status) : done ? 'done' : 'todo';
      return h('li', { class: `step step-${tone}`, dataset: { step: label } },
        h('span', { class: 'step-dot' }), h('span', { class: 'step-label' }, label),
        h('span', { class: 'step-time muted small' }, at ? clock(at) : ''));
    });
    let outcome = null;
    if (error) outcome = h('p', { class: 'form-error' }, error);
    else if (c?.error != null) outcome = h('pre', { id: 'command-result', class: 'result-box result-bad' }, valueText(c.error));
    else if (c?.result != null) outcome = h('pre', { id: 'command-result', class: 'result-box' }, pretty(c.result));
    else if (final) outcome = h('p', { class: 'muted' }, 'No result.');
    else outcome = h('p', { class: 'muted' }, 'Waiting for the device…');
    fill(trackerBox,
      h('div', { class: 'tracker-head' },
        h('strong', {}, tracked.name), ' ',
        c ? h('span', { class: 'muted small mono' }, c.id) : null,
        h('span', { class: 'grow' }),
        pill(status, error ? 'bad' : statusTone(status))),
      h('ol', { class: 'steps' }, stepEls),
      outcome);
  }

  async function sendCommand() {
    formError.textContent = '';
    const name = nameInput.value.trim();
    let params;
    try {
      params = JSON.parse(paramsInput.value.trim() || '{}');
    } catch (e) {
      formError.textContent = `The parameters are not JSON: ${e.message}`;
      return;
    }
    if (params === null || typeof params !== 'object' || Array.isArray(params)) {
      formError.textContent = 'The parameters must be a JSON object.';
      return;
    }
    const wait = Number(waitInput.value || 0);
    if (!Number.isInteger(wait) || wait < 0 || wait > 60) {
      formError.textContent = 'Wait is a whole number of seconds from 0 to 60.';
      return;
    }
    // The key lets this page recognise its command in the event stream before the POST
    // answers (with a wait, it answers only at the end).
    tracked = { key: `console-${randomHex(12)}`, name, command: null };
    renderTracker();
    sendButton.disabled = true;
    try {
      const body = { name, params, idempotency_key: tracked.key };
      if (wait > 0) body.wait_s = wait;
      const { data } = await call('POST', `/devices/${seg(id)}/commands`, body);
      upsertCommand(data);
      if (!tracked.command) { tracked.command = data; renderTracker(); }
    } catch (e) {
      renderTracker(e instanceof ApiError ? `${e.code}: ${e.message}` : e.message);
    } finally {
      sendButton.disabled = false;
    }
  }

  // --- sessions

  async function loadSessions() {
    try {
      const page = await get(`/devices/${seg(id)}/sessions${query({ limit: 20 })}`);
      fill(sessionsBody, page.items.length ? page.items.map((s) => h('tr', {},
        h('td', {}, clock(s.connected_at)),
        h('td', {}, s.disconnected_at ? clock(s.disconnected_at) : pill('connected', 'ok')),
        h('td', {}, s.disconnect_reason ? h('span', { class: 'reason' }, s.disconnect_reason) : h('span', { class: 'muted' }, '—')),
        h('td', { class: 'mono' }, s.remote_addr ?? ''),
        h('td', {}, s.auth ?? ''))) : h('tr', {}, h('td', { colspan: 5, class: 'muted' }, 'No connections yet.')));
    } catch (e) {
      fill(sessionsBody, h('tr', {}, h('td', { colspan: 5, class: 'muted' }, `Cannot list sessions: ${e.message}`)));
    }
  }

  function loadSessionsSoon() {
    clearTimeout(sessionsTimer);
    sessionsTimer = setTimeout(loadSessions, 300);
  }

  // --- events and first load

  function onEvent(type, p) {
    switch (type) {
      case 'telemetry':
        onTelemetry(p);
        break;
      case 'command.updated':
        upsertCommand(p);
        break;
      case 'device.connected':
        if (device) {
          Object.assign(device, { online: true, last_connected_at: p.at, last_seen_at: p.at });
          renderDevice();
        }
        loadSessionsSoon();
        break;
      case 'device.disconnected':
        if (device) {
          Object.assign(device, { online: false, last_disconnected_at: p.at, last_disconnect_reason: p.reason });
          renderDevice();
        }
        loadSessionsSoon();
        break;
      case 'lagged':
        refresh(); // events were lost to this page: read everything again
        break;
      default:
        break;
    }
  }

  /** Reads the device, its latest values, commands and sessions again (after a gap). */
  async function refresh() {
    try {
      device = await get(`/devices/${seg(id)}`);
      renderDevice();
      latest = await get(`/devices/${seg(id)}/telemetry/latest`).catch(() => latest);
      renderLatest();
      updateKeyChoices();
      seedChart(chart.key);
      const page = await get(`/devices/${seg(id)}/commands${query({ limit: 50 })}`);
      for (const c of page.items.reverse()) upsertCommand(c);
    } catch (e) {
      console.warn('refresh:', e.message);
    }
    loadSessions();
  }

  async function load() {
    try {
      device = await get(`/devices/${seg(id)}`);
    } catch (e) {
      fill(root, h('div', { class: 'empty' },
        e.status === 404 ? `There is no device ${id}. ` : `Cannot load the device: ${e.message}. `,
        h('a', { href: '#/' }, 'Back to the fleet')));
      stream.stop();
      return;
    }
    renderDevice();
    try {
      latest = await get(`/devices/${seg(id)}/telemetry/latest`);
    } catch (e) {
      if (e.status !== 404) console.warn('latest:', e.message);
    }
    renderLatest();
    updateKeyChoices();
    if (!chart.key) chart.reset('', []);
    try {
      const page = await get(`/devices/${seg(id)}/commands${query({ limit: 50 })}`);
      for (const c of page.items) upsertCommand(c, { prepend: false });
      if (!page.items.length) commandsBody.append(h('tr', { class: 'placeholder' }, h('td', { colspan: 5, class: 'muted' }, 'No commands yet.')));
    } catch (e) {
      console.warn('commands:', e.message);
    }
    loadSessions();
  }

  const stream = new EventStream({ device: id, onEvent, onState: setStreamState, onResync: refresh }).start();
  load();
  return () => {
    stream.stop();
    chart.destroy();
    clearTimeout(sessionsTimer);
  };
}
