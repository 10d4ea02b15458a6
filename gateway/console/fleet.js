// The fleet: every device with its presence, kept current by the live event stream.

import { get, query } from './api.js';
import { h, fill, pill, relTime, clock } from './dom.js';
import { EventStream } from './events.js';

const PAGE = 100;

/** Mounts the fleet view in `root`; returns its cleanup. */
export function mountFleet(root, { setStreamState }) {
  const devices = new Map(); // id -> device (as the API shows it, kept current)
  const rows = new Map(); // id -> {tr, and its cells}
  let cursor = null;
  let loaded = false;
  let pending = []; // events that arrived while the list was loading
  let reloadTimer = null;

  const summary = h('span', { class: 'summary', id: 'fleet-summary' });
  const filter = h('input', { type: 'search', placeholder: 'Filter by id or name', class: 'input-search', id: 'fleet-filter', oninput: () => applyFilter() });
  const onlineOnly = h('input', { type: 'checkbox', id: 'fleet-online-only', onchange: () => applyFilter() });
  const tbody = h('tbody', { id: 'fleet-rows' });
  const more = h('button', { class: 'btn', type: 'button', hidden: true, onclick: () => loadPage() }, 'Load more');
  const status = h('p', { class: 'muted', id: 'fleet-status' }, 'Loading…');

  fill(root,
    h('div', { class: 'page-head' },
      h('div', {}, h('h1', {}, 'Fleet'), summary),
      h('div', { class: 'toolbar' }, filter,
        h('label', { class: 'check' }, onlineOnly, 'Online only'))),
    h('div', { class: 'card card-flush' },
      h('table', { class: 'table', id: 'fleet-table' },
        h('thead', {}, h('tr', {},
          h('th', {}, 'Device'), h('th', {}, 'State'), h('th', {}, 'Last seen'),
          h('th', {}, 'Connected'), h('th', {}, 'Last disconnect'))),
        tbody),
      status),
    h('div', { class: 'more' }, more));

  // Rows are built once and their cells updated in place: a busy fleet re-renders often,
  // and a link replaced under the pointer would swallow the operator's click.
  function render(d) {
    let r = rows.get(d.id);
    if (!r) {
      r = {
        tr: h('tr', { dataset: { deviceId: d.id } }),
        device: h('td', {}),
        state: h('td', { class: 'state' }),
        seen: h('td', { class: 'last-seen' }),
        connected: h('td', { class: 'connected' }),
        disconnect: h('td', { class: 'last-disconnect' }),
      };
      r.tr.append(r.device, r.state, r.seen, r.connected, r.disconnect);
      rows.set(d.id, r);
      tbody.append(r.tr);
    }
    fill(r.device,
      h('a', { class: 'device-link', href: `#/devices/${encodeURIComponent(d.id)}` }, d.id),
      d.name && d.name !== d.id ? h('div', { class: 'muted small device-name' }, d.name) : null);
    renderPresence(d, r);
    applyFilterTo(d, r.tr);
  }

  function renderPresence(d, r) {
    r.tr.dataset.online = String(Boolean(d.online));
    fill(r.state, d.online ? pill('online', 'ok') : pill('offline', 'muted'),
      d.enabled === false ? pill('disabled', 'bad') : null);
    renderSeen(d, r);
    fill(r.connected, d.online && d.last_connected_at ? clock(d.last_connected_at) : h('span', { class: 'muted' }, '—'));
    fill(r.disconnect, d.last_disconnect_reason
      ? [h('span', { class: 'reason' }, d.last_disconnect_reason), ' ', h('span', { class: 'muted small' }, clock(d.last_disconnected_at))]
      : h('span', { class: 'muted' }, '—'));
  }

  function renderSeen(d, r) {
    fill(r.seen, relTime(d.last_seen_at));
  }

  function applyFilterTo(d, tr) {
    const text = filter.value.trim().toLowerCase();
    const match = !text || d.id.toLowerCase().includes(text) || (d.name ?? '').toLowerCase().includes(text);
    tr.hidden = !match || (onlineOnly.checked && !d.online);
  }

  function applyFilter() {
    for (const [id, r] of rows) applyFilterTo(devices.get(id), r.tr);
  }

  function updateSummary() {
    let online = 0;
    for (const d of devices.values()) if (d.online) online += 1;
    summary.textContent = `${devices.size}${cursor ? '+' : ''} devices · ${online} online`;
    summary.dataset.online = String(online);
    if (loaded && devices.size === 0) {
      status.hidden = false;
      status.textContent = 'No devices yet. Create one on the Browser device page, or start a simulated fleet (./demo.sh).';
    } else {
      status.hidden = loaded;
    }
  }

  async function loadPage() {
    more.disabled = true;
    try {
      const page = await get(`/devices${query({ limit: PAGE, cursor })}`);
      for (const d of page.items) {
        devices.set(d.id, d);
        render(d);
      }
      cursor = page.next_cursor;
      more.hidden = !cursor;
    } finally {
      more.disabled = false;
    }
  }

  async function reload() {
    loaded = false;
    devices.clear();
    rows.clear();
    tbody.replaceChildren();
    cursor = null;
    try {
      await loadPage();
      loaded = true;
      const queued = pending;
      pending = [];
      for (const [type, payload] of queued) apply(type, payload);
    } catch (e) {
      status.hidden = false;
      status.textContent = `Cannot list the devices: ${e.message}`;
      return;
    }
    updateSummary();
  }

  function reloadSoon() {
    if (reloadTimer) return;
    reloadTimer = setTimeout(() => { reloadTimer = null; reload(); }, 1000);
  }

  function apply(type, p) {
    if (!loaded) {
      pending.push([type, p]);
      return;
    }
    if (type === 'lagged') { reloadSoon(); return; }
    const d = devices.get(p.device_id);
    if (!d) {
      // A device this page has not listed: new, or on a page not loaded yet.
      if (type === 'device.connected' && !cursor) reloadSoon();
      return;
    }
    const r = rows.get(d.id);
    switch (type) {
      case 'device.connected':
        Object.assign(d, { online: true, last_connected_at: p.at, last_seen_at: p.at });
        renderPresence(d, r);
        break;
      case 'device.disconnected':
        Object.assign(d, {
          online: false, last_disconnected_at: p.at, last_disconnect_reason: p.reason,
        });
        renderPresence(d, r);
        break;
      case 'telemetry':
        if (!d.last_seen_at || p.received_at > d.last_seen_at) {
          d.last_seen_at = p.received_at;
          renderSeen(d, r);
        }
        return;
      default:
        return;
    }
    applyFilterTo(d, r.tr);
    updateSummary();
  }

  const stream = new EventStream({ onEvent: apply, onState: setStreamState, onResync: reloadSoon }).start();
  reload();
  return () => {
    stream.stop();
    clearTimeout(reloadTimer);
  };
}
