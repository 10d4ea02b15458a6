// Reference peer for the benchmarks (bench/run.sh, bench/first.sh): the subset of the gateway
// contract (PROTOCOL.md v1) that they use, written the way the classic `ws` server example does
// it. One process, one event loop, better-sqlite3 (synchronous). Every write of one event-loop
// turn (telemetry, command changes) is committed in one transaction (setImmediate flush), and
// acks and answers are sent only after that COMMIT.
//
// Subset: token auth in the Authorization header; telemetry (single and `points`) with dedupe
// and ack after commit; commands: POST /v1/devices/{id}/commands with wait_s (201 when final
// within the wait, else 202 with the status so far), delivery to an online device with at most
// COMMAND_WINDOW in flight (the rest queued, sent on reconnect or when a slot frees), the
// device's ack (delivered) and command_result (final, acked after commit); GET /v1/devices
// (cursor, online=true), GET /v1/devices/{id}, POST /v1/devices, token rotation. Not here: ttl_s
// and timeout_s (no expiry), idempotency keys, cancel, telemetry queries, events, sessions.
// GET /metrics answers `gateway_connections N` only, the gauge the benchmark polls.
//
//   node server.js --cert server.pem --key server-key.pem [--database peer.db]
//                  [--device-addr 127.0.0.1:0] [--api-addr 127.0.0.1:0] [--synchronous full|normal]
// With LISTEN_FDS=1 (systemd socket activation, bench/hold-listener.py) the device socket is
// descriptor 3 and --device-addr is not used.
// The operator API key comes from the environment (PEER_API_KEY), never the command line.
'use strict';
const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const https = require('node:https');
const { WebSocketServer } = require('ws');
const Database = require('better-sqlite3');

const args = { database: 'peer.db', 'device-addr': '127.0.0.1:0', 'api-addr': '127.0.0.1:0', synchronous: 'full' };
for (let i = 2; i < process.argv.length; i += 2) {
  const name = process.argv[i].replace(/^--/, '');
  if (!(name in args) && name !== 'cert' && name !== 'key') fail(`unknown option ${process.argv[i]}`);
  args[name] = process.argv[i + 1];
}
const API_KEY = process.env.PEER_API_KEY;
if (!args.cert || !args.key || !API_KEY) fail('need --cert, --key and PEER_API_KEY');
if (!['full', 'normal'].includes(args.synchronous)) fail('--synchronous must be full or normal');
function fail(message) { console.error(`node-ws peer: ${message}`); process.exit(2); }

// --- storage --------------------------------------------------------------------------------
const db = new Database(args.database);
db.pragma('journal_mode = WAL');
db.pragma(`synchronous = ${args.synchronous.toUpperCase()}`);
db.exec(`
  CREATE TABLE IF NOT EXISTS devices (pk INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
    name TEXT, metadata TEXT NOT NULL DEFAULT '{}', enabled INTEGER NOT NULL DEFAULT 1,
    token_hash BLOB NOT NULL UNIQUE, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
  CREATE TABLE IF NOT EXISTS telemetry (device_pk INTEGER NOT NULL, msg_id TEXT NOT NULL,
    seq INTEGER NOT NULL, ts INTEGER NOT NULL, received_at INTEGER NOT NULL, data TEXT NOT NULL);
  CREATE UNIQUE INDEX IF NOT EXISTS telemetry_dedupe ON telemetry (device_pk, msg_id, seq);
  CREATE INDEX IF NOT EXISTS telemetry_by_ts ON telemetry (device_pk, ts);
  CREATE TABLE IF NOT EXISTS commands (id TEXT PRIMARY KEY, device_pk INTEGER NOT NULL, name TEXT NOT NULL,
    params TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL, sent_at INTEGER,
    delivered_at INTEGER, completed_at INTEGER, result TEXT, error TEXT);
  CREATE INDEX IF NOT EXISTS commands_open ON commands (device_pk, status, created_at);`);
const sql = {
  create: db.prepare(`INSERT INTO devices (id, name, metadata, token_hash, created_at, updated_at)
                      VALUES (?, ?, ?, ?, ?, ?)`),
  rotate: db.prepare('UPDATE devices SET token_hash = ?, updated_at = ? WHERE id = ?'),
  byToken: db.prepare('SELECT pk, id, enabled FROM devices WHERE token_hash = ?'),
  byId: db.prepare('SELECT * FROM devices WHERE id = ?'),
  page: db.prepare('SELECT * FROM devices WHERE pk > ? ORDER BY pk LIMIT ?'),
  commandInsert: db.prepare(`INSERT INTO commands (id, device_pk, name, params, status, created_at, sent_at)
                             VALUES (?, ?, ?, ?, ?, ?, ?)`),
  commandSent: db.prepare("UPDATE commands SET status = 'sent', sent_at = ? WHERE id = ? AND status = 'queued'"),
  commandDelivered: db.prepare(`UPDATE commands SET status = 'delivered', delivered_at = ?
                                WHERE id = ? AND status IN ('queued', 'sent')`),
  commandFinal: db.prepare(`UPDATE commands SET status = ?, completed_at = ?, result = ?, error = ?,
                            delivered_at = COALESCE(delivered_at, ?)
                            WHERE id = ? AND status IN ('queued', 'sent', 'delivered')`),
  commandById: db.prepare('SELECT c.*, d.id AS device_id FROM commands c JOIN devices d ON d.pk = c.device_pk WHERE c.id = ?'),
  commandsOpen: db.prepare(`SELECT c.*, d.id AS device_id FROM commands c JOIN devices d ON d.pk = c.device_pk
                            WHERE c.device_pk = ? AND c.status IN ('queued', 'sent') ORDER BY c.created_at, c.rowid`),
  insert: db.prepare(`INSERT OR IGNORE INTO telemetry (device_pk, msg_id, seq, ts, received_at, data)
                      VALUES (?, ?, ?, ?, ?, ?)`),
};
const sha256 = (text) => crypto.createHash('sha256').update(text).digest();
const newToken = () => crypto.randomBytes(32).toString('base64url');

// Group commit: every write of one event-loop turn goes into one transaction. A write is
// { write(): runs its statements, done(ok): what follows the COMMIT (acks, answers) }.
let pending = [];
const writeAll = db.transaction((batch) => {
  for (const w of batch) w.write();
});
function enqueue(w) {
  if (pending.length === 0) setImmediate(flush);
  pending.push(w);
}
function flush() {
  const batch = pending;
  pending = [];
  let ok = true;
  try {
    writeAll.immediate(batch); // BEGIN IMMEDIATE ... COMMIT; durable per --synchronous when it returns
  } catch (e) {
    console.error(`node-ws peer: commit failed: ${e.message}`);
    ok = false;
  }
  for (const w of batch) w.done(ok);
}
function telemetryWrite(ws, id, rows) {
  return {
    write() { for (const row of rows) sql.insert.run(row); },
    done(ok) {
      if (ws.readyState !== ws.OPEN) return;
      ws.send(ok ? JSON.stringify({ type: 'ack', id })
        : JSON.stringify({ type: 'error', id, code: 'internal', message: 'storage failed' }));
    },
  };
}

// --- device side ----------------------------------------------------------------------------
function parseTs(ts, now) {
  if (ts === undefined || ts === null) return now;
  const ms = typeof ts === 'number' ? ts : typeof ts === 'string' ? Date.parse(ts) : NaN;
  return Number.isFinite(ms) ? Math.trunc(ms) : null;
}
const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

// Validates one telemetry message; returns its rows or a complaint (a string).
function telemetryRows(msg, devicePk) {
  if (typeof msg.id !== 'string' || msg.id.length === 0 || Buffer.byteLength(msg.id) > 128) return 'id must be a string of 1..128 bytes';
  const now = Date.now();
  const points = msg.points !== undefined ? msg.points : [{ ts: msg.ts, data: msg.data }];
  if (!Array.isArray(points) || points.length === 0 || points.length > 1000) return 'points must be an array of 1..1000 points';
  const rows = [];
  for (let seq = 0; seq < points.length; seq++) {
    const p = points[seq];
    if (!isObject(p) || !isObject(p.data)) return 'data must be an object';
    const ts = parseTs(p.ts, now);
    if (ts === null) return 'ts must be RFC 3339 or epoch milliseconds';
    rows.push([devicePk, msg.id, seq, ts, now, JSON.stringify(p.data)]);
  }
  return rows;
}

// --- commands -------------------------------------------------------------------------------
const COMMAND_WINDOW = 8;
const FINAL = new Set(['succeeded', 'failed', 'rejected']);
const open = new Map(); // command id -> its record while not final (and while answers wait)
const waiters = new Map(); // command id -> [{ res, timer }]
const iso = (ms) => (ms === null || ms === undefined ? null : new Date(ms).toISOString());

function commandJson(c) {
  return { id: c.id, device_id: c.device_id, name: c.name, params: typeof c.params === 'string' ? JSON.parse(c.params) : c.params,
    status: c.status, created_at: iso(c.created_at), sent_at: iso(c.sent_at), delivered_at: iso(c.delivered_at),
    completed_at: iso(c.completed_at), expires_at: null, timeout_s: null,
    result: typeof c.result === 'string' ? JSON.parse(c.result) : (c.result ?? null), error: c.error ?? null, idempotency_key: null };
}
function commandMessage(c) {
  return JSON.stringify({ type: 'command', id: c.id, name: c.name, params: typeof c.params === 'string' ? JSON.parse(c.params) : c.params });
}
// Answers the operators waiting for command c with `status` (201 final, 202 the wait ran out).
function answerWaiters(c, status) {
  const list = waiters.get(c.id);
  if (!list) return;
  waiters.delete(c.id);
  for (const w of list) { clearTimeout(w.timer); send(w.res, status, commandJson(c)); }
}
// Sends the oldest queued commands of the session's device while its window has room; each is
// marked sent in the next commit and written to the socket after it.
function fillWindow(s) {
  while (s.inflight.size < COMMAND_WINDOW && s.queued.length > 0) {
    const c = s.queued.shift();
    if (c.status !== 'queued') continue;
    s.inflight.add(c.id);
    const now = Date.now();
    enqueue({
      write() { sql.commandSent.run(now, c.id); },
      done(ok) {
        if (!ok) { s.inflight.delete(c.id); s.queued.unshift(c); return; }
        if (c.status === 'queued') { c.status = 'sent'; c.sent_at = now; }
        if (s.ws.readyState === s.ws.OPEN) s.ws.send(commandMessage(c));
      },
    });
  }
}
// A device's ack (receipt) or command_result for command `id`.
function onCommandAnswer(s, msg) {
  const c = open.get(msg.id);
  if (!c || c.device_pk !== s.device.pk) {
    const stored = sql.commandById.get(msg.id);
    if (!stored || stored.device_pk !== s.device.pk) return s.complain(msg.id, 'unknown_command', 'no such command');
    // Already final: a duplicate or late result is acked and changes nothing.
    if (msg.type === 'command_result') s.ws.send(JSON.stringify({ type: 'ack', id: msg.id }));
    return;
  }
  const now = Date.now();
  if (msg.type === 'ack') {
    if (c.status !== 'queued' && c.status !== 'sent') return;
    return enqueue({
      write() { sql.commandDelivered.run(now, c.id); },
      done(ok) { if (ok && (c.status === 'queued' || c.status === 'sent')) { c.status = 'delivered'; c.delivered_at = now; } },
    });
  }
  if (!FINAL.has(msg.status)) return s.complain(msg.id, 'invalid_message', 'status must be succeeded, failed or rejected');
  const result = msg.result === undefined ? null : JSON.stringify(msg.result);
  const error = typeof msg.error === 'string' ? msg.error : null;
  enqueue({
    write() { sql.commandFinal.run(msg.status, now, result, error, now, c.id); },
    done(ok) {
      if (!ok) return s.complain(msg.id, 'internal', 'storage failed');
      if (!FINAL.has(c.status)) {
        Object.assign(c, { status: msg.status, completed_at: now, result, error, delivered_at: c.delivered_at ?? now });
        open.delete(c.id);
        s.inflight.delete(c.id);
        answerWaiters(c, 201);
        fillWindow(s);
      }
      if (s.ws.readyState === s.ws.OPEN) s.ws.send(JSON.stringify({ type: 'ack', id: msg.id }));
    },
  });
}
// POST /v1/devices/{id}/commands.
function createCommand(res, deviceId, body) {
  if (!isObject(body) || typeof body.name !== 'string' || body.name.length === 0) return apiError(res, 422, 'invalid', 'name is required');
  const params = body.params === undefined ? {} : body.params;
  if (!isObject(params)) return apiError(res, 422, 'invalid', 'params must be an object');
  const waitS = body.wait_s === undefined || body.wait_s === null ? 0 : body.wait_s;
  if (!Number.isInteger(waitS) || waitS < 0 || waitS > 60) return apiError(res, 422, 'invalid', 'wait_s must be 0..60');
  const device = sql.byId.get(deviceId);
  if (!device) return apiError(res, 404, 'not_found', 'no such device');
  const now = Date.now();
  const s = live.get(deviceId);
  const direct = s !== undefined && s.inflight.size < COMMAND_WINDOW && s.queued.length === 0;
  const c = { id: `c-${crypto.randomUUID()}`, device_pk: device.pk, device_id: deviceId, name: body.name, params,
    status: direct ? 'sent' : 'queued', created_at: now, sent_at: direct ? now : null, delivered_at: null,
    completed_at: null, result: null, error: null };
  if (direct) s.inflight.add(c.id);
  enqueue({
    write() { sql.commandInsert.run(c.id, c.device_pk, c.name, JSON.stringify(params), c.status, now, c.sent_at); },
    done(ok) {
      if (!ok) { if (direct) s.inflight.delete(c.id); return apiError(res, 503, 'unavailable', 'storage failed'); }
      open.set(c.id, c);
      const session = live.get(deviceId);
      if (direct && session === s && s.ws.readyState === s.ws.OPEN) s.ws.send(commandMessage(c));
      else if (!direct && session) { session.queued.push(c); fillWindow(session); }
      if (waitS === 0) return send(res, 201, commandJson(c));
      const w = { res, timer: setTimeout(() => {
        const list = waiters.get(c.id) || [];
        const i = list.indexOf(w);
        if (i >= 0) list.splice(i, 1);
        if (list.length === 0) waiters.delete(c.id);
        send(res, 202, commandJson(c));
      }, waitS * 1000) };
      if (!waiters.has(c.id)) waiters.set(c.id, []);
      waiters.get(c.id).push(w);
    },
  });
}

const live = new Map(); // device id -> its session { ws, device, inflight: Set of command ids, queued: [command] }
const wss = new WebSocketServer({
  noServer: true, clientTracking: false, maxPayload: 65536, perMessageDeflate: false,
  handleProtocols: (offered) => (offered.has('iot-gateway.v1') ? 'iot-gateway.v1' : false),
});

function refuse(socket, status, error, message) {
  const body = JSON.stringify({ error, message });
  socket.end(`HTTP/1.1 ${status} ${http.STATUS_CODES[status]}\r\nContent-Type: application/json\r\n` +
    `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
}

const deviceServer = https.createServer({ cert: fs.readFileSync(args.cert), key: fs.readFileSync(args.key) },
  (req, res) => { res.writeHead(404, { 'Content-Type': 'application/json' }).end('{"error":"not_found","message":"use /v1/connect"}'); });
deviceServer.on('upgrade', (req, socket, head) => {
  socket.on('error', () => socket.destroy());
  const url = new URL(req.url, 'https://peer');
  if (url.pathname !== '/v1/connect') return refuse(socket, 404, 'not_found', 'use /v1/connect');
  if (url.searchParams.has('token') || url.searchParams.has('access_token')) return refuse(socket, 400, 'bad_request', 'send the token in the Authorization header');
  const m = /^Bearer ([A-Za-z0-9_-]+)$/.exec(req.headers.authorization || '');
  const device = m && sql.byToken.get(sha256(m[1]));
  if (!device) return refuse(socket, 401, 'unauthorized', 'missing or unknown token');
  if (!device.enabled) return refuse(socket, 403, 'device_disabled', 'the device is disabled');
  wss.handleUpgrade(req, socket, head, (ws) => session(ws, device));
});

function session(ws, device) {
  const previous = live.get(device.id);
  if (previous) previous.ws.close(4001, 'session replaced');
  let invalid = 0;
  const complain = (id, code, message) => {
    ws.send(JSON.stringify({ type: 'error', ...(typeof id === 'string' ? { id } : {}), code, message }));
    if (code === 'invalid_message' && ++invalid >= 10) ws.close(1008, 'too many invalid messages');
  };
  const s = { ws, device, inflight: new Set(), queued: [], complain };
  live.set(device.id, s);
  ws.isAlive = true;
  ws.on('pong', () => { ws.isAlive = true; });
  ws.on('error', () => {});
  ws.on('close', () => { if (live.get(device.id) === s) live.delete(device.id); });
  ws.send(JSON.stringify({ type: 'welcome', device_id: device.id, session_id: crypto.randomUUID(),
    server_time: new Date().toISOString(), limits: { max_message_bytes: 65536, telemetry_per_sec: 1000000 } }));
  // At-least-once: what was sent but not acked goes again, then the queue, oldest first.
  for (const row of sql.commandsOpen.all(device.pk)) {
    const c = open.get(row.id) ?? row;
    open.set(c.id, c);
    if (c.status === 'sent') { s.inflight.add(c.id); ws.send(commandMessage(c)); } else s.queued.push(c);
  }
  fillWindow(s);
  ws.on('message', (data, isBinary) => {
    ws.isAlive = true;
    if (isBinary) return ws.close(1003, 'text frames only');
    let msg;
    try { msg = JSON.parse(data); } catch { return complain(undefined, 'invalid_message', 'not JSON'); }
    if (!isObject(msg)) return complain(undefined, 'invalid_message', 'not a JSON object');
    if (msg.type === 'telemetry') {
      const rows = telemetryRows(msg, device.pk);
      if (typeof rows === 'string') return complain(msg.id, 'invalid_message', rows);
      invalid = 0;
      return enqueue(telemetryWrite(ws, msg.id, rows));
    }
    if (msg.type === 'ack' || msg.type === 'command_result') {
      if (typeof msg.id !== 'string') return complain(undefined, 'invalid_message', 'id must be a string');
      invalid = 0;
      return onCommandAnswer(s, msg);
    }
    complain(msg.id, 'invalid_message', 'unknown type');
  });
}

// The classic heartbeat: ping every 30 s, terminate a socket that did not answer the last one.
const heartbeat = setInterval(() => {
  for (const { ws } of live.values()) {
    if (!ws.isAlive) { ws.close(4008, 'idle'); ws.terminate(); continue; }
    ws.isAlive = false;
    ws.ping();
  }
}, 30000);

// --- operator API ---------------------------------------------------------------------------
const apiKeyHash = sha256(API_KEY);
function send(res, status, body) {
  res.writeHead(status, { 'Content-Type': 'application/json' }).end(JSON.stringify(body));
}
const apiError = (res, status, error, message) => send(res, status, { error, message });
const ID = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;

function deviceJson(d) {
  return { id: d.id, name: d.name, metadata: JSON.parse(d.metadata), enabled: d.enabled === 1, online: live.has(d.id),
    created_at: iso(d.created_at) };
}

const apiServer = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/metrics') {
    res.writeHead(200, { 'Content-Type': 'text/plain; version=0.0.4' });
    return res.end(`# TYPE gateway_connections gauge\ngateway_connections ${live.size}\n`);
  }
  const key = /^Bearer (.+)$/.exec(req.headers.authorization || '');
  if (!key || !crypto.timingSafeEqual(sha256(key[1]), apiKeyHash)) return apiError(res, 401, 'unauthorized', 'missing or wrong API key');
  const chunks = [];
  let size = 0;
  req.on('data', (c) => { size += c.length; if (size <= 1 << 20) chunks.push(c); });
  req.on('end', () => {
    if (size > 1 << 20) return apiError(res, 413, 'too_large', 'body over 1 MiB');
    let body = {};
    try { if (size > 0) body = JSON.parse(Buffer.concat(chunks)); } catch { return apiError(res, 400, 'bad_request', 'malformed JSON'); }
    const now = Date.now();
    const url = new URL(req.url, 'http://peer');
    const rotate = /^\/v1\/devices\/([^/]+)\/token$/.exec(url.pathname);
    const commands = /^\/v1\/devices\/([^/]+)\/commands$/.exec(url.pathname);
    const one = /^\/v1\/devices\/([^/]+)$/.exec(url.pathname);
    if (req.method === 'POST' && commands) return createCommand(res, decodeURIComponent(commands[1]), body);
    if (req.method === 'GET' && one) {
      const d = sql.byId.get(decodeURIComponent(one[1]));
      return d ? send(res, 200, deviceJson(d)) : apiError(res, 404, 'not_found', 'no such device');
    }
    if (req.method === 'GET' && url.pathname === '/v1/devices') {
      const limit = Math.min(Number(url.searchParams.get('limit') || 100), 1000);
      const onlineOnly = url.searchParams.get('online') === 'true';
      let after = Number(url.searchParams.get('cursor') || 0);
      if (!Number.isInteger(limit) || limit < 1 || !Number.isInteger(after)) return apiError(res, 400, 'bad_request', 'bad limit or cursor');
      const items = [];
      let next = null;
      page: for (;;) {
        const rows = sql.page.all(after, limit);
        for (const d of rows) {
          after = d.pk;
          if (onlineOnly && !live.has(d.id)) continue;
          items.push(deviceJson(d));
          if (items.length === limit) { next = String(after); break page; }
        }
        if (rows.length < limit) break;
      }
      return send(res, 200, { items, next_cursor: next });
    }
    if (req.method === 'POST' && url.pathname === '/v1/devices') {
      if (!isObject(body) || typeof body.id !== 'string' || !ID.test(body.id)) return apiError(res, 422, 'invalid', 'id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}');
      const token = newToken();
      const name = typeof body.name === 'string' ? body.name : null;
      const metadata = isObject(body.metadata) ? body.metadata : {};
      try {
        sql.create.run(body.id, name, JSON.stringify(metadata), sha256(token), now, now);
      } catch (e) {
        if (e.code === 'SQLITE_CONSTRAINT_UNIQUE') return apiError(res, 409, 'conflict', 'the device exists');
        throw e;
      }
      return send(res, 201, { id: body.id, name, metadata, enabled: true, created_at: new Date(now).toISOString(), token });
    }
    if (req.method === 'POST' && rotate) {
      const id = decodeURIComponent(rotate[1]);
      const token = newToken();
      if (sql.rotate.run(sha256(token), now, id).changes === 0) return apiError(res, 404, 'not_found', 'no such device');
      live.get(id)?.ws.close(4003, 'token rotated');
      return send(res, 200, { token });
    }
    apiError(res, 404, 'not_found', 'not part of this peer');
  });
});

// --- start and stop -------------------------------------------------------------------------
// A device socket handed over as systemd does (LISTEN_FDS=1: descriptor 3) is served as is.
function listen(server, addr, handle) {
  const i = addr.lastIndexOf(':');
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    const done = () => resolve(server.address().port);
    if (handle) server.listen(handle, done);
    else server.listen(Number(addr.slice(i + 1)), addr.slice(0, i), done);
  });
}
const deviceHandle = process.env.LISTEN_FDS === '1' ? { fd: 3 } : null;
Promise.all([listen(deviceServer, args['device-addr'], deviceHandle), listen(apiServer, args['api-addr'])]).then(([dp, ap]) => {
  console.log(`listening device=wss://127.0.0.1:${dp}/v1/connect api=http://127.0.0.1:${ap}/v1`);
}, (e) => fail(`cannot listen: ${e.message}`));

function shutdown() {
  clearInterval(heartbeat);
  deviceServer.close();
  apiServer.close();
  for (const { ws } of live.values()) ws.close(1001, 'shutting down');
  if (pending.length) flush();
  // A moment for the close frames to leave, then stop (what is acked is committed already).
  setTimeout(() => { db.close(); process.exit(0); }, 300);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
