// The browser device: a device implemented in this page with the plain WebSocket API, so
// that both ends of the protocol are visible. It authenticates with the `bearer.<token>`
// subprotocol (browsers cannot set headers on a WebSocket), sends telemetry and waits for
// each ack, and answers commands: an ack on receipt, then a command_result.
//
// The device outlives the view: it keeps running while the operator looks at the fleet or
// at its own device page, until Disconnect or sign-out.

import { ApiError, call, consoleConfig } from './api.js';
import { card, clock, field, fill, h, pill, randomHex } from './dom.js';

const SUBPROTOCOL = 'iot-gateway.v1';
const LOG_MAX = 200;
const MIN_INTERVAL_MS = 100;
const MAX_INTERVAL_MS = 86_400_000;

const CLOSE_CODES = {
  1000: 'normal close',
  1001: 'the gateway is shutting down',
  1003: 'binary frame refused',
  1006: 'connection lost or refused (the browser gives no detail)',
  1007: 'invalid UTF-8',
  1008: 'policy violation: too many invalid messages',
  1009: 'message too large',
  4001: 'session replaced by a newer connection of this device',
  4003: 'device disabled, deleted or its token rotated',
  4008: 'idle timeout',
};

/** The one device this page runs. */
class BrowserDevice {
  constructor() {
    this.ws = null;
    this.state = 'disconnected';
    this.deviceId = '';
    this.log = [];
    this.listeners = new Set();
    this.sent = 0;
    this.acked = 0;
    this.pending = new Set(); // telemetry ids sent, not acked yet
    this.answered = new Map(); // command id -> its command_result (redelivery is answered again, not re-run)
    this.intervalMs = 2000;
    this.auto = true;
    this.timer = null;
    this.prefix = randomHex(4);
    this.counter = 0;
    this.temp = 20 + Math.random() * 4;
  }

  notify() {
    for (const f of this.listeners) f();
  }

  record(dir, kind, text) {
    this.log.unshift({ at: new Date().toISOString(), dir, kind, text });
    if (this.log.length > LOG_MAX) this.log.length = LOG_MAX;
    this.notify();
  }

  connect(url, id, token) {
    this.disconnect();
    this.deviceId = id;
    this.state = 'connecting';
    this.record('info', 'connect', `connecting to ${url} as ${id}`);
    let ws;
    try {
      ws = new WebSocket(url, [SUBPROTOCOL, `bearer.${token}`]);
    } catch (e) {
      this.state = 'disconnected';
      this.record('info', 'error', `cannot connect: ${e.message}`);
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (ws !== this.ws) return;
      this.state = 'connected';
      this.record('info', 'open', `connected (subprotocol ${ws.protocol || 'none'})`);
    };
    ws.onmessage = (e) => {
      if (ws !== this.ws) return;
      this.receive(e.data);
    };
    ws.onerror = () => {
      if (ws !== this.ws) return;
      const hint = url.startsWith('wss:')
        ? ' If the gateway uses its generated development certificate, open '
          + `${url.replace(/^wss:/, 'https:').replace(/\/v1\/connect$/, '/')} once in this browser and accept it.`
        : '';
      this.record('info', 'error', `WebSocket error (refused, unreachable, or a certificate the browser does not trust).${hint}`);
    };
    ws.onclose = (e) => {
      if (ws !== this.ws) return;
      this.stopTimer();
      this.ws = null;
      this.state = 'closed';
      const why = CLOSE_CODES[e.code] ?? '';
      this.record('info', 'close', `closed: ${e.code}${why ? ` (${why})` : ''}${e.reason ? `: ${e.reason}` : ''}`);
    };
    this.notify();
  }

  disconnect() {
    this.stopTimer();
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      this.state = 'disconnected';
      ws.close(1000, 'bye');
      this.record('info', 'close', 'disconnected by the operator (1000)');
    }
  }

  send(msg) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
      this.record('info', 'error', 'not connected');
      return false;
    }
    const text = JSON.stringify(msg);
    this.ws.send(text);
    this.record('out', msg.type, text);
    return true;
  }

  receive(text) {
    this.record('in', kindOf(text), text);
    let msg;
    try { msg = JSON.parse(text); } catch { return; }
    switch (msg.type) {
      case 'welcome':
        this.restartTimer();
        break;
      case 'ack':
        if (this.pending.delete(msg.id)) this.acked += 1;
        break;
      case 'command':
        this.answer(msg);
        break;
      default:
        break;
    }
    this.notify();
  }

  /** Ack on receipt, then the outcome; a redelivered command gets its first answer again. */
  answer(cmd) {
    if (typeof cmd.id !== 'string') return;
    this.send({ type: 'ack', id: cmd.id });
    let result = this.answered.get(cmd.id);
    if (!result) {
      result = { type: 'command_result', id: cmd.id, ...execute(cmd, this) };
      this.answered.set(cmd.id, result);
      if (this.answered.size > 256) this.answered.delete(this.answered.keys().next().value);
    }
    this.send(result);
  }

  /** One telemetry message with `data`; its id is unique to this page and counted until acked. */
  sendTelemetry(data) {
    const id = `b-${this.prefix}-${this.counter}`;
    if (this.send({ type: 'telemetry', id, ts: new Date().toISOString(), data })) {
      this.counter += 1;
      this.sent += 1;
      this.pending.add(id);
      this.notify();
    }
  }

  /** A simulated reading: a temperature on a small random walk, and a counter. */
  sendReading() {
    this.temp = Math.min(35, Math.max(10, this.temp + (Math.random() - 0.5) * 0.6));
    this.sendTelemetry({ temp: Math.round(this.temp * 100) / 100, counter: this.counter });
  }

  setAuto(on) {
    this.auto = on;
    this.restartTimer();
  }

  setInterval(ms) {
    this.intervalMs = ms;
    this.restartTimer();
  }

  restartTimer() {
    this.stopTimer();
    if (this.auto && this.state === 'connected') {
      this.timer = setInterval(() => this.sendReading(), this.intervalMs);
    }
    this.notify();
  }

  stopTimer() {
    clearInterval(this.timer);
    this.timer = null;
  }
}

/** What the browser device does with a command: `{status, result}` or `{status, error}`. */
function execute(cmd, device) {
  const params = cmd.params && typeof cmd.params === 'object' ? cmd.params : {};
  switch (cmd.name) {
    case 'ping':
      return { status: 'succeeded', result: { pong: true, ts: new Date().toISOString() } };
    case 'set_interval': {
      const ms = params.interval_ms ?? (typeof params.interval_s === 'number' ? params.interval_s * 1000 : undefined);
      if (!Number.isFinite(ms) || ms < MIN_INTERVAL_MS || ms > MAX_INTERVAL_MS) {
        return { status: 'failed', error: `params need interval_ms from ${MIN_INTERVAL_MS} to ${MAX_INTERVAL_MS}` };
      }
      device.setInterval(Math.round(ms));
      return { status: 'succeeded', result: { interval_ms: Math.round(ms) } };
    }
    case 'fail':
      return { status: 'failed', error: typeof params.error === 'string' ? params.error : 'failed on request' };
    default:
      return { status: 'rejected', error: 'unknown command' };
  }
}

function kindOf(text) {
  try { return JSON.parse(text).type ?? 'message'; } catch { return 'message'; }
}

const device = new BrowserDevice();

/** Closes the browser device's connection (on sign-out). */
export function disconnectBrowserDevice() {
  device.disconnect();
}

const STATE_TONES = { connected: 'ok', connecting: 'info', closed: 'warn', disconnected: 'muted' };

/** Mounts the browser device page in `root`; returns its cleanup (the device keeps running). */
export function mountBrowserDevice(root) {
  const idInput = h('input', { id: 'bd-id', autocomplete: 'off', spellcheck: 'false', placeholder: 'browser-1', value: device.deviceId || `browser-${randomHex(3)}` });
  const tokenInput = h('input', { id: 'bd-token', type: 'password', autocomplete: 'off', spellcheck: 'false', placeholder: 'the device token' });
  const urlInput = h('input', { id: 'bd-url', spellcheck: 'false', placeholder: 'wss://host:8443/v1/connect' });
  const identityNote = h('p', { class: 'muted small', id: 'bd-identity-note', role: 'status' });
  const createButton = h('button', { class: 'btn', type: 'button', id: 'bd-create', onclick: () => create() }, 'Create this device');
  const connectButton = h('button', { class: 'btn btn-primary', type: 'submit', id: 'bd-connect' }, 'Connect');
  const disconnectButton = h('button', { class: 'btn', type: 'button', id: 'bd-disconnect', onclick: () => device.disconnect() }, 'Disconnect');
  const state = h('span', { id: 'bd-state' });
  const form = h('form', { class: 'stack', onsubmit: (e) => { e.preventDefault(); connect(); } },
    field('Device id', idInput),
    field('Token', tokenInput, 'An existing device\'s token, or create the device here: its token is filled in (and shown nowhere else).'),
    h('div', {}, createButton),
    identityNote,
    field('Gateway device URL', urlInput, 'The device listener, as the gateway serves it at /console/config.json.'),
    h('div', { class: 'row' }, connectButton, disconnectButton, h('span', { class: 'grow' }), state));

  const auto = h('input', { type: 'checkbox', id: 'bd-auto', checked: device.auto, onchange: () => device.setAuto(auto.checked) });
  const interval = h('select', { id: 'bd-interval', onchange: () => device.setInterval(Number(interval.value)) },
    [[500, 'every 0.5 s'], [1000, 'every second'], [2000, 'every 2 s'], [5000, 'every 5 s']].map(([ms, label]) =>
      h('option', { value: String(ms), selected: ms === device.intervalMs }, label)));
  const custom = h('textarea', { id: 'bd-custom', rows: 3, spellcheck: 'false' });
  custom.value = '{"note": "hello from the browser"}';
  const customError = h('p', { class: 'form-error', role: 'alert' });
  const counts = h('p', { class: 'counts', id: 'bd-counts' });

  const logList = h('ol', { class: 'log', id: 'bd-log' });

  fill(root,
    h('div', { class: 'page-head' },
      h('div', {},
        h('h1', {}, 'Browser device'),
        h('p', { class: 'muted lead' }, 'A device running in this page on the browser\'s WebSocket API. '
          + 'It authenticates with the bearer.<token> subprotocol, sends telemetry and answers commands '
          + '(ping, set_interval, fail; anything else is rejected as unknown). Watch it from the fleet.'))),
    h('div', { class: 'grid grid-even' },
      h('div', { class: 'stack' },
        card('Connection', null, form),
        card('Telemetry', null,
          h('div', { class: 'row' },
            h('label', { class: 'check' }, auto, 'Send a reading'), interval,
            h('span', { class: 'grow' }),
            h('button', { class: 'btn', type: 'button', id: 'bd-send-reading', onclick: () => device.sendReading() }, 'Send one now')),
          counts,
          field('Custom data (a JSON object)', custom),
          customError,
          h('div', {}, h('button', { class: 'btn', type: 'button', id: 'bd-send-custom', onclick: () => sendCustom() }, 'Send as telemetry')))),
      h('div', { class: 'stack' },
        card('Event log', h('button', { class: 'btn btn-ghost btn-small', type: 'button', onclick: () => { device.log.length = 0; render(); } }, 'Clear'),
          logList))));

  function render() {
    const connected = device.state === 'connected';
    fill(state, pill(device.state, STATE_TONES[device.state] ?? 'muted'));
    state.dataset.state = device.state;
    connectButton.disabled = connected || device.state === 'connecting';
    disconnectButton.disabled = !device.ws;
    fill(counts,
      h('span', {}, 'Sent ', h('strong', { id: 'bd-sent' }, String(device.sent))),
      h('span', {}, 'Acked ', h('strong', { id: 'bd-acked' }, String(device.acked))),
      h('span', {}, 'Commands answered ', h('strong', { id: 'bd-answered' }, String(device.answered.size))),
      h('span', {}, 'Interval ', h('strong', { id: 'bd-interval-ms' }, `${device.intervalMs} ms`)));
    if (Array.from(interval.options).some((o) => o.value === String(device.intervalMs))) {
      interval.value = String(device.intervalMs);
    }
    counts.dataset.sent = String(device.sent);
    counts.dataset.acked = String(device.acked);
    fill(logList, device.log.length ? device.log.map((e) =>
      h('li', { class: `log-entry log-${e.dir}`, dataset: { kind: e.kind, dir: e.dir } },
        h('time', { class: 'log-time' }, clock(e.at)),
        h('span', { class: 'log-dir', title: e.dir }, { in: '←', out: '→', info: '•' }[e.dir]),
        h('span', { class: 'log-kind' }, e.kind),
        h('code', { class: 'log-text' }, e.text.length > 400 ? `${e.text.slice(0, 400)}…` : e.text)))
      : h('li', { class: 'log-empty muted' }, 'Nothing yet: connect the device.'));
  }

  async function create() {
    const id = idInput.value.trim();
    identityNote.textContent = '';
    createButton.disabled = true;
    try {
      const { data } = await call('POST', '/devices', {
        id, name: 'Browser device', metadata: { kind: 'browser', user_agent: navigator.userAgent.slice(0, 120) },
      });
      tokenInput.value = data.token;
      identityNote.textContent = `Created ${data.id}. Its token is in the field above: keep it to connect again later.`;
    } catch (e) {
      identityNote.textContent = e instanceof ApiError && e.status === 409
        ? `${id} exists already: enter its token, or choose another id.`
        : `Cannot create the device: ${e.message}`;
    } finally {
      createButton.disabled = false;
    }
  }

  function connect() {
    const id = idInput.value.trim();
    const token = tokenInput.value.trim();
    const url = urlInput.value.trim();
    if (!id || !token || !url) {
      identityNote.textContent = 'A device id, its token and the device URL are needed.';
      return;
    }
    device.connect(url, id, token);
  }

  function sendCustom() {
    customError.textContent = '';
    let data;
    try { data = JSON.parse(custom.value); } catch (e) {
      customError.textContent = `Not JSON: ${e.message}`;
      return;
    }
    if (data === null || typeof data !== 'object' || Array.isArray(data)) {
      customError.textContent = 'Telemetry data must be a JSON object.';
      return;
    }
    device.sendTelemetry(data);
  }

  consoleConfig().then((config) => {
    if (urlInput.value) return;
    const d = config.device;
    urlInput.value = `${d.scheme}://${d.host ?? location.hostname}:${d.port}${d.path}`;
  }).catch(() => {
    if (!urlInput.value) urlInput.value = `wss://${location.hostname}:8443/v1/connect`;
  });

  device.listeners.add(render);
  render();
  return () => device.listeners.delete(render);
}
