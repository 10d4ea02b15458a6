#!/usr/bin/env bash
# Command round-trip benchmark of the gateway, on this machine, against 127.0.0.1 only.
# `device-sim bench-commands`: 100 online devices that answer at once; 1,000 `ping` commands sent
# through the operator API with `wait_s`, round-robin, 100 operators (one command outstanding per
# device); each round trip timed client-side from sending the POST to reading the answer
# (`201`, status `succeeded`; anything else is an error). Four runs, one after the other:
#   1. no other load, one operator (one command at a time: the round trip without queueing),
#   2. no other load, 100 operators,
#   3. 100 operators, 100 other devices streaming telemetry at a fixed rate,
#   4. 100 operators, 100 other devices each keeping 8 telemetry messages in flight (as much as
#      the gateway takes),
# and, for reference, the same saturating telemetry alone (`device-sim bench`, 10 s), so that the
# last run can be read against telemetry without commands on the same build and machine.
# The gateway runs from a fresh temporary directory (database, development certificates) that is
# removed at the end. Everything stops by itself; every wait has a time limit.
#
# Knobs (environment): CMD_DEVICES (100), CMD_COMMANDS (1000), CMD_CONCURRENCY (= CMD_DEVICES;
# run 1 always has one operator),
# CMD_WAIT_S (10), BG_DEVICES (100), BG_RATE (20 msgs/s per device), BG_INFLIGHT (8),
# BG_WARMUP (2s), BENCH_SYNCHRONOUS (full), BENCH_TMPDIR (default $TMPDIR or /tmp).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CMD_DEVICES=${CMD_DEVICES:-100}
CMD_COMMANDS=${CMD_COMMANDS:-1000}
CMD_CONCURRENCY=${CMD_CONCURRENCY:-$CMD_DEVICES}
CMD_WAIT_S=${CMD_WAIT_S:-10}
BG_DEVICES=${BG_DEVICES:-100}
BG_RATE=${BG_RATE:-20}
BG_INFLIGHT=${BG_INFLIGHT:-8}
BG_WARMUP=${BG_WARMUP:-2s}
BENCH_SYNCHRONOUS=${BENCH_SYNCHRONOUS:-full}
TMP_BASE=${BENCH_TMPDIR:-${TMPDIR:-/tmp}}

log() { printf '[commands.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

TMP=""
GATEWAY_PID=""

# Stops what this script started (by pid, never by name) and removes the temporary directory.
cleanup() {
    local status=$?
    if [[ -n $GATEWAY_PID ]]; then
        kill -TERM "$GATEWAY_PID" 2>/dev/null || true
        wait_for_exit "$GATEWAY_PID" 20
    fi
    if [[ $status -ne 0 && -f $TMP/server.log ]]; then
        log "last lines of the gateway's log:"
        tail -n 20 "$TMP/server.log" >&2 || true
    fi
    [[ -n $TMP ]] && rm -rf "$TMP"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for_exit PID SECONDS: waits for our child PID, SIGKILLing it after SECONDS; sets EXIT_STATUS.
EXIT_STATUS=0
wait_for_exit() {
    local pid=$1 watchdog
    (sleep "$2" && kill -KILL "$pid" 2>/dev/null) &
    watchdog=$!
    EXIT_STATUS=0
    wait "$pid" || EXIT_STATUS=$?
    kill "$watchdog" 2>/dev/null || true
    wait "$watchdog" 2>/dev/null || true
}

# wait_for_line FILE PATTERN SECONDS PID: waits until FILE has a line matching PATTERN,
# failing early if PID exits.
wait_for_line() {
    local file=$1 pattern=$2 deadline=$((SECONDS + $3)) pid=$4
    until grep -qE "$pattern" "$file" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || die "process $pid exited before printing /$pattern/"
        ((SECONDS < deadline)) || die "no /$pattern/ in $file after $3 s"
        sleep 0.1
    done
}

# json_field FILE NAME: the first number called NAME in device-sim's one-line JSON output.
json_field() { grep -oE "\"$2\":[-0-9.eE+]+" "$1" | head -n1 | cut -d: -f2; }

new_key() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# --- build ------------------------------------------------------------------------------
log "building (release)"
(cd "$ROOT" && cargo build --release -p gateway -p device-sim)
GATEWAY_BIN=$ROOT/target/release/gateway
SIM_BIN=$ROOT/target/release/device-sim
[[ -x $GATEWAY_BIN && -x $SIM_BIN ]] || die "release binaries missing"

# --- start the gateway ------------------------------------------------------------------
TMP=$(mktemp -d "$TMP_BASE/gateway-commands.XXXXXX")
mkdir -p "$TMP/data"
API_KEY=$(new_key)
log "starting the gateway in $TMP"
(
    cd "$TMP"
    # The key goes through the environment, not the command line; the per-device telemetry rate
    # limit is raised so that the saturating background load is not just refused.
    export GATEWAY_API_KEY=$API_KEY GATEWAY_TELEMETRY_RATE=1000000 GATEWAY_TELEMETRY_BURST=1000000
    exec "$GATEWAY_BIN" --device-addr 127.0.0.1:0 --api-addr 127.0.0.1:0 \
        --database-url "sqlite://$TMP/data/gateway.db" --synchronous "$BENCH_SYNCHRONOUS"
) >"$TMP/server.out" 2>"$TMP/server.log" &
GATEWAY_PID=$!
wait_for_line "$TMP/server.out" '^listening ' 60 "$GATEWAY_PID"
LINE=$(grep -m1 '^listening ' "$TMP/server.out")
DEVICE_URL=$(sed -nE 's/.* device=([^ ]+).*/\1/p' <<<"$LINE")
API_URL=$(sed -nE 's/.* api=([^ ]+).*/\1/p' <<<"$LINE")
[[ $DEVICE_URL =~ ^wss?://127\.0\.0\.1:[0-9]+/ ]] || die "unexpected device URL in: $LINE"
[[ $API_URL =~ ^http://127\.0\.0\.1:[0-9]+/ ]] || die "unexpected API URL in: $LINE"
[[ -f $TMP/certs/ca.pem || $DEVICE_URL == ws://* ]] || die "no development CA at $TMP/certs/ca.pem"
log "gateway pid $GATEWAY_PID: device=$DEVICE_URL api=$API_URL"

# --- the runs ---------------------------------------------------------------------------
# run NAME OPERATORS ARGS...: one bench-commands run, its JSON in $TMP/NAME.json and its table
# on stderr.
declare -A STATUS=()
run() {
    local name=$1 operators=$2 status=0
    shift 2
    log "run '$name': $CMD_COMMANDS commands over $CMD_DEVICES devices, $operators operators $*"
    (
        export DEVICE_SIM_URL=$DEVICE_URL GATEWAY_API_URL=$API_URL GATEWAY_API_KEY=$API_KEY
        exec timeout 600 "$SIM_BIN" --ca "$TMP/certs/ca.pem" --tokens "$TMP/data/sim-tokens.json" \
            bench-commands --devices "$CMD_DEVICES" --commands "$CMD_COMMANDS" \
            --concurrency "$operators" --wait-s "$CMD_WAIT_S" --json "$@"
    ) >"$TMP/$name.json" || status=$?
    # Status 2: the benchmark ran but saw errors (reported below); anything else: it did not run.
    [[ $status -eq 0 || $status -eq 2 ]] || die "device-sim bench-commands ($name) failed (status $status)"
    STATUS[$name]=$status
}

run serial 1
run none "$CMD_CONCURRENCY"
run rate "$CMD_CONCURRENCY" --background-devices "$BG_DEVICES" --background-rate "$BG_RATE" --background-warmup "$BG_WARMUP"
run inflight "$CMD_CONCURRENCY" --background-devices "$BG_DEVICES" --background-inflight "$BG_INFLIGHT" \
    --background-warmup "$BG_WARMUP"

# --- reference: the saturating telemetry alone ------------------------------------------
log "reference: telemetry alone, $BG_DEVICES devices x $BG_INFLIGHT in flight for 10 s"
REF_STATUS=0
(
    export DEVICE_SIM_URL=$DEVICE_URL GATEWAY_API_URL=$API_URL GATEWAY_API_KEY=$API_KEY
    exec timeout 120 "$SIM_BIN" --ca "$TMP/certs/ca.pem" --tokens "$TMP/data/sim-tokens.json" \
        --prefix sim-bg bench --devices "$BG_DEVICES" --inflight "$BG_INFLIGHT" \
        --duration 10s --warmup 2s --json
) >"$TMP/reference.json" || REF_STATUS=$?
[[ $REF_STATUS -eq 0 || $REF_STATUS -eq 2 ]] || die "device-sim bench (reference) failed (status $REF_STATUS)"

# --- stop the gateway -------------------------------------------------------------------
kill -TERM "$GATEWAY_PID"
wait_for_exit "$GATEWAY_PID" 30
GATEWAY_EXIT=$EXIT_STATUS
GATEWAY_PID=""

# --- summary ----------------------------------------------------------------------------
row() { printf '%-26s | %9s | %10s | %9s | %9s | %9s | %9s | %17s | %6s | %s\n' "$@"; }
line() {
    local name=$1 operators=$2 label=$3 J=$TMP/$1.json background="-"
    if grep -q '"background":{' "$J"; then
        background=$(grep -oE '"background":\{[^}]*\}' "$J" | grep -oE '"msgs_per_sec":[0-9.]+' | cut -d: -f2)
    fi
    row "$label" "$operators" "$(json_field "$J" commands_per_sec)" "$(json_field "$J" p50_ms)" \
        "$(json_field "$J" p90_ms)" "$(json_field "$J" p99_ms)" "$(json_field "$J" max_ms)" \
        "$(json_field "$J" gateway_p50_ms)/$(json_field "$J" gateway_p99_ms)" \
        "$(json_field "$J" errors)" "$background"
}

echo
echo "== command round trip: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, gateway and simulator on the same machine, synchronous=$BENCH_SYNCHRONOUS =="
echo "$CMD_COMMANDS ping commands (POST wait_s=$CMD_WAIT_S until succeeded) per run, round-robin over $CMD_DEVICES online devices; latencies in ms, client-side"
row "background telemetry" "operators" "commands/s" "p50" "p90" "p99" "max" "gw p50/p99" "errors" "background acked msgs/s"
line serial 1 "none"
line none "$CMD_CONCURRENCY" "none"
line rate "$CMD_CONCURRENCY" "$BG_DEVICES devices x $BG_RATE msgs/s"
line inflight "$CMD_CONCURRENCY" "$BG_DEVICES devices x $BG_INFLIGHT in flight"
for name in serial none rate inflight; do
    kinds=$(grep -oE '"(command|device)_errors":\{[^}]*\}' "$TMP/$name.json" | tr '\n' ' ')
    [[ ${STATUS[$name]} -eq 0 ]] || echo "errors in '$name' (device-sim exit status ${STATUS[$name]}): $kinds"
done
echo "gw p50/p99: the gateway's own created_at -> completed_at (millisecond timestamps)"
echo "reference: the background of the last run alone, no commands: $(json_field "$TMP/reference.json" msgs_per_sec) msgs/s acked (ack p50 $(json_field "$TMP/reference.json" p50_ms) ms, p99 $(json_field "$TMP/reference.json" p99_ms) ms, $(json_field "$TMP/reference.json" errors) errors)"
echo "gateway exit $GATEWAY_EXIT after SIGTERM"
