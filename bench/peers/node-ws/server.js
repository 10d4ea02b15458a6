// Reference peer for bench/first.sh: the subset of the gateway contract (PROTOCOL.md v1) that the
// benchmark uses, written the way the classic `ws` server example does it. One process, one event
// loop, better-sqlite3 (synchronous). Telemetry of one event-loop turn is committed in one
// transaction (setImmediate flush), and acks are sent only after that COMMIT.
//
//   node server.js --cert server.pem --key server-key.pem [--database peer.db]
//                  [--device-addr 127.0.0.1:0] [--api-addr 127.0.0.1:0] [--synchronous full|normal]
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
  CREATE INDEX IF NOT EXISTS telemetry_by_ts ON telemetry (device_pk, ts);`);
const sql = {
  create: db.prepare(`INSERT INTO devices (id, name, metadata, token_hash, created_at, updated_at)
                      VALUES (?, ?, ?, ?, ?, ?)`),
  rotate: db.prepare('UPDATE devices SET token_hash = ?, updated_at = ? WHERE id = ?'),
  byToken: db.prepare('SELECT pk, id, enabled FROM devices WHERE token_hash = ?'),
  insert: db.prepare(`INSERT OR IGNORE INTO telemetry (device_pk, msg_id, seq, ts, received_at, data)
                      VALUES (?, ?, ?, ?, ?, ?)`),
};
const sha256 = (text) => crypto.createHash('sha256').update(text).digest();
const newToken = () => crypto.randomBytes(32).toString('base64url');

// Group commit: everything validated during one event-loop turn goes into one transaction.
let pending = []; // { ws, id, rows: [[device_pk, msg_id, seq, ts, received_at, data], ...] }
const insertAll = db.transaction((batch) => {
  for (const m of batch) for (const row of m.rows) sql.insert.run(row);
});
function enqueue(message) {
  if (pending.length === 0) setImmediate(flush);
  pending.push(message);
}
function flush() {
  const batch = pending;
  pending = [];
  let reply = (m) => JSON.stringify({ type: 'ack', id: m.id });
  try {
    insertAll.immediate(batch); // BEGIN IMMEDIATE ... COMMIT; durable per --synchronous when it returns
  } catch (e) {
    console.error(`node-ws peer: telemetry commit failed: ${e.message}`);
    reply = (m) => JSON.stringify({ type: 'error', id: m.id, code: 'internal', message: 'storage failed' });
  }
  for (const m of batch) if (m.ws.readyState === m.ws.OPEN) m.ws.send(reply(m));
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

const live = new Map(); // device id -> its socket
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
  if (previous) previous.close(4001, 'session replaced');
  live.set(device.id, ws);
  ws.isAlive = true;
  ws.on('pong', () => { ws.isAlive = true; });
  ws.on('error', () => {});
  ws.on('close', () => { if (live.get(device.id) === ws) live.delete(device.id); });
  ws.send(JSON.stringify({ type: 'welcome', device_id: device.id, session_id: crypto.randomUUID(),
    server_time: new Date().toISOString(), limits: { max_message_bytes: 65536, telemetry_per_sec: 1000000 } }));
  let invalid = 0;
  const complain = (id, code, message) => {
    ws.send(JSON.stringify({ type: 'error', ...(typeof id === 'string' ? { id } : {}), code, message }));
    if (code === 'invalid_message' && ++invalid >= 10) ws.close(1008, 'too many invalid messages');
  };
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
      return enqueue({ ws, id: msg.id, rows });
    }
    if (msg.type === 'ack' || msg.type === 'command_result') return complain(msg.id, 'unknown_command', 'no such command');
    complain(msg.id, 'invalid_message', 'unknown type');
  });
}

// The classic heartbeat: ping every 30 s, terminate a socket that did not answer the last one.
const heartbeat = setInterval(() => {
  for (const ws of live.values()) {
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

const apiServer = http.createServer((req, res) => {
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
    const rotate = /^\/v1\/devices\/([^/]+)\/token$/.exec(req.url);
    if (req.method === 'POST' && req.url === '/v1/devices') {
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
      live.get(id)?.close(4003, 'token rotated');
      return send(res, 200, { token });
    }
    apiError(res, 404, 'not_found', 'not part of this peer');
  });
});

// --- start and stop -------------------------------------------------------------------------
function listen(server, addr) {
  const i = addr.lastIndexOf(':');
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(Number(addr.slice(i + 1)), addr.slice(0, i), () => resolve(server.address().port));
  });
}
Promise.all([listen(deviceServer, args['device-addr']), listen(apiServer, args['api-addr'])]).then(([dp, ap]) => {
  console.log(`listening device=wss://127.0.0.1:${dp}/v1/connect api=http://127.0.0.1:${ap}/v1`);
}, (e) => fail(`cannot listen: ${e.message}`));

function shutdown() {
  clearInterval(heartbeat);
  deviceServer.close();
  apiServer.close();
  for (const ws of live.values()) ws.close(1001, 'shutting down');
  if (pending.length) flush();
  // A moment for the close frames to leave, then stop (what is acked is committed already).
  setTimeout(() => { db.close(); process.exit(0); }, 300);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
