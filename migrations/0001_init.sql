-- The device registry, its connection history, durable telemetry and the
-- command queue. Times are Unix epoch milliseconds (UTC).

CREATE TABLE devices (
    -- Surrogate key: telemetry and sessions refer to it, so a device deleted and
    -- created again under the same id never inherits the old device's data.
    pk                      INTEGER PRIMARY KEY AUTOINCREMENT,
    id                      TEXT    NOT NULL UNIQUE,
    name                    TEXT,
    metadata                TEXT    NOT NULL DEFAULT '{}',
    enabled                 INTEGER NOT NULL DEFAULT 1,
    -- SHA-256 of the device token; the token itself is never stored.
    token_hash              BLOB    NOT NULL UNIQUE,
    created_at              INTEGER NOT NULL,
    updated_at              INTEGER NOT NULL,
    last_connected_at       INTEGER,
    last_disconnected_at    INTEGER,
    last_seen_at            INTEGER,
    last_disconnect_reason  TEXT
);

CREATE TABLE telemetry (
    device_pk    INTEGER NOT NULL,
    msg_id       TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    ts           INTEGER NOT NULL,
    received_at  INTEGER NOT NULL,
    data         TEXT    NOT NULL
);
-- A message id re-sent by a device is stored once (INSERT OR IGNORE).
CREATE UNIQUE INDEX telemetry_dedupe ON telemetry (device_pk, msg_id, seq);
-- Range queries and cursor pagination by (ts, rowid).
CREATE INDEX telemetry_by_ts ON telemetry (device_pk, ts);

CREATE TABLE sessions (
    session_id         TEXT    PRIMARY KEY,
    device_pk          INTEGER NOT NULL,
    connected_at       INTEGER NOT NULL,
    disconnected_at    INTEGER,
    disconnect_reason  TEXT,
    remote_addr        TEXT    NOT NULL,
    auth               TEXT    NOT NULL
);
CREATE INDEX sessions_by_device ON sessions (device_pk, connected_at);

CREATE TABLE commands (
    id               TEXT    PRIMARY KEY,
    device_pk        INTEGER NOT NULL,
    name             TEXT    NOT NULL,
    params           TEXT    NOT NULL DEFAULT '{}',
    status           TEXT    NOT NULL,
    created_at       INTEGER NOT NULL,
    sent_at          INTEGER,
    delivered_at     INTEGER,
    completed_at     INTEGER,
    expires_at       INTEGER NOT NULL,
    timeout_s        INTEGER NOT NULL,
    result           TEXT,
    error            TEXT,
    idempotency_key  TEXT
);
CREATE INDEX commands_by_device ON commands (device_pk, created_at);
CREATE UNIQUE INDEX commands_idempotency ON commands (device_pk, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
