#!/usr/bin/env bash
# First benchmark of the gateway, on this machine, against 127.0.0.1 only:
#   1. throughput and ack latency of durable telemetry (device-sim bench),
#   2. gateway memory per idle connection (device-sim idle, VmRSS before/after),
#   3. the disk's fsync latency, the floor under every durable ack.
# The gateway runs from a fresh temporary directory (database, development certificates)
# that is removed at the end. Everything stops by itself; every wait has a time limit.
#
# Knobs (environment): BENCH_DEVICES (100), BENCH_INFLIGHT (8), BENCH_DURATION (20s),
# BENCH_WARMUP (2s), IDLE_DEVICES (5000), BENCH_TELEMETRY_RATE (per-device telemetry rate
# limit for the gateway, default 1000000 so that the limit does not cap the measurement),
# BENCH_TMPDIR (where the temporary directory goes; default $TMPDIR or /tmp).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DEVICES=${BENCH_DEVICES:-100}
BENCH_INFLIGHT=${BENCH_INFLIGHT:-8}
BENCH_DURATION=${BENCH_DURATION:-20s}
BENCH_WARMUP=${BENCH_WARMUP:-2s}
IDLE_DEVICES=${IDLE_DEVICES:-5000}
BENCH_TELEMETRY_RATE=${BENCH_TELEMETRY_RATE:-1000000}

log() { printf '[first.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

GATEWAY_PID=""
IDLE_PID=""
TMP=""

# Stops what this script started (by pid, never by name) and removes the temporary directory.
cleanup() {
    local status=$?
    exec 3>&- 2>/dev/null || true
    if [[ -n $IDLE_PID ]]; then
        kill -TERM "$IDLE_PID" 2>/dev/null || true
        wait_for_exit "$IDLE_PID" 15
    fi
    if [[ -n $GATEWAY_PID ]]; then
        kill -TERM "$GATEWAY_PID" 2>/dev/null || true
        wait_for_exit "$GATEWAY_PID" 20
    fi
    if [[ $status -ne 0 && -n $TMP && -f $TMP/gateway.log ]]; then
        log "last lines of the gateway's log:"
        tail -n 20 "$TMP/gateway.log" >&2 || true
    fi
    [[ -n $TMP ]] && rm -rf "$TMP"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for_exit PID SECONDS: waits for our child PID, SIGKILLing it after SECONDS; sets EXIT_STATUS.
# (Not in a $(...) subshell: only this shell can wait for its children.)
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

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# json_field FILE NAME: a top-level number from device-sim's one-line JSON output.
json_field() { grep -oE "\"$2\":[-0-9.eE+]+" "$1" | head -n1 | cut -d: -f2; }

# --- build ------------------------------------------------------------------------------
log "building (release)"
(cd "$ROOT" && cargo build --release -p gateway -p device-sim)
GATEWAY_BIN=$ROOT/target/release/gateway
SIM_BIN=$ROOT/target/release/device-sim
[[ -x $GATEWAY_BIN && -x $SIM_BIN ]] || die "release binaries missing"

# --- start the gateway ------------------------------------------------------------------
TMP=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/gateway-bench.XXXXXX")
mkdir -p "$TMP/data"
API_KEY=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')

log "starting the gateway in $TMP"
(
    cd "$TMP"
    # The per-device telemetry rate limit would otherwise cap throughput at 100 msgs/s per device.
    export GATEWAY_TELEMETRY_RATE=$BENCH_TELEMETRY_RATE GATEWAY_TELEMETRY_BURST=$BENCH_TELEMETRY_RATE
    exec "$GATEWAY_BIN" --device-addr 127.0.0.1:0 --api-addr 127.0.0.1:0 \
        --database-url "sqlite://$TMP/data/gateway.db" --api-key "$API_KEY"
) >"$TMP/gateway.out" 2>"$TMP/gateway.log" &
GATEWAY_PID=$!
wait_for_line "$TMP/gateway.out" '^listening ' 60 "$GATEWAY_PID"

LISTENING=$(grep -m1 '^listening ' "$TMP/gateway.out")
DEVICE_URL=$(sed -nE 's/.* device=([^ ]+).*/\1/p' <<<"$LISTENING")
API_URL=$(sed -nE 's/.* api=([^ ]+).*/\1/p' <<<"$LISTENING")
[[ $DEVICE_URL =~ ^wss?://127\.0\.0\.1:[0-9]+/ ]] || die "unexpected device URL in: $LISTENING"
[[ $API_URL =~ ^http://127\.0\.0\.1:[0-9]+/ ]] || die "unexpected API URL in: $LISTENING"
[[ -f $TMP/certs/ca.pem || $DEVICE_URL == ws://* ]] || die "no development CA at $TMP/certs/ca.pem"
log "gateway pid $GATEWAY_PID: device=$DEVICE_URL api=$API_URL"

# device-sim reads these; the key stays off its command line.
export DEVICE_SIM_URL=$DEVICE_URL GATEWAY_API_URL=$API_URL GATEWAY_API_KEY=$API_KEY
SIM=("$SIM_BIN" --ca "$TMP/certs/ca.pem" --tokens "$TMP/data/sim-tokens.json")

# --- provision --------------------------------------------------------------------------
log "provisioning $IDLE_DEVICES devices"
PROVISION_START=$(date +%s.%N)
timeout 300 "${SIM[@]}" provision --devices "$IDLE_DEVICES"
PROVISION_S=$(awk -v a="$PROVISION_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')

# --- throughput and latency -------------------------------------------------------------
log "bench: $BENCH_DEVICES devices x $BENCH_INFLIGHT in flight, $BENCH_DURATION after $BENCH_WARMUP warm-up"
BENCH_STATUS=0
timeout 600 "${SIM[@]}" bench --devices "$BENCH_DEVICES" --inflight "$BENCH_INFLIGHT" \
    --duration "$BENCH_DURATION" --warmup "$BENCH_WARMUP" --json >"$TMP/bench.json" || BENCH_STATUS=$?
# Status 2: the benchmark ran but saw errors (reported below); anything else: it did not run.
[[ $BENCH_STATUS -eq 0 || $BENCH_STATUS -eq 2 ]] || die "device-sim bench failed (status $BENCH_STATUS)"

# --- memory per idle connection ---------------------------------------------------------
sleep 2
RSS_BEFORE=$(rss_kib "$GATEWAY_PID")
log "idle: $IDLE_DEVICES connections (gateway VmRSS before: $RSS_BEFORE KiB)"
mkfifo "$TMP/idle.stdin"
timeout 900 "${SIM[@]}" idle --devices "$IDLE_DEVICES" --hold 10m \
    <"$TMP/idle.stdin" >"$TMP/idle.out" 2>"$TMP/idle.log" &
IDLE_PID=$!
# Holding the fifo's write end open keeps idle running; closing it tells idle to finish.
exec 3>"$TMP/idle.stdin"
wait_for_line "$TMP/idle.out" '^connected ' 300 "$IDLE_PID"
IDLE_LINE=$(grep -m1 '^connected ' "$TMP/idle.out")
IDLE_CONNECTED=$(awk '{ print $2 }' <<<"$IDLE_LINE")
sleep 3
RSS_AFTER=$(rss_kib "$GATEWAY_PID")
# The simulator's own footprint (timeout's child), for the record.
SIM_RSS=$(rss_kib "$(pgrep -P "$IDLE_PID" | head -n1)" 2>/dev/null || echo "?")
exec 3>&-
wait_for_exit "$IDLE_PID" 30
IDLE_STATUS=$EXIT_STATUS
IDLE_PID=""
if [[ $IDLE_CONNECTED -gt 0 ]]; then
    RSS_PER_CONN=$(awk -v a="$RSS_BEFORE" -v b="$RSS_AFTER" -v n="$IDLE_CONNECTED" 'BEGIN { printf "%.1f", (b - a) / n }')
else
    RSS_PER_CONN="n/a"
fi

# --- disk fsync latency -----------------------------------------------------------------
FS_TYPE=$(stat -f -c %T "$TMP")
DD_OUT=$(LC_ALL=C dd if=/dev/zero of="$TMP/fsync.probe" bs=4k count=200 oflag=dsync 2>&1)
DD_S=$(tail -n1 <<<"$DD_OUT" | sed -nE 's/.*copied, ([0-9.]+) s.*/\1/p')
FSYNC_MS=$(awk -v s="${DD_S:-0}" 'BEGIN { printf "%.3f", s * 1000 / 200 }')
rm -f "$TMP/fsync.probe"

# --- stop the gateway -------------------------------------------------------------------
kill -TERM "$GATEWAY_PID"
wait_for_exit "$GATEWAY_PID" 30
GATEWAY_STATUS=$EXIT_STATUS
[[ $GATEWAY_STATUS != 137 ]] || GATEWAY_STATUS="137 (still running 30 s after SIGTERM: killed)"
GATEWAY_PID=""

# --- summary ----------------------------------------------------------------------------
B=$TMP/bench.json
RATE_SEEN=$(json_field "$B" telemetry_per_sec_limit || true)
RATE_SEEN=${RATE_SEEN%.0}
cat <<EOF

== first benchmark: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, gateway and simulator on the same machine ==
provision        $IDLE_DEVICES devices in ${PROVISION_S}s
throughput       $(json_field "$B" msgs_per_sec) msgs/s acked ($(json_field "$B" connected)/$BENCH_DEVICES devices x $BENCH_INFLIGHT in flight, ~$(json_field "$B" payload_bytes)-byte messages, $BENCH_DURATION after $BENCH_WARMUP warm-up)
ack latency      p50 $(json_field "$B" p50_ms) ms  p90 $(json_field "$B" p90_ms) ms  p99 $(json_field "$B" p99_ms) ms  max $(json_field "$B" max_ms) ms
bench errors     $(json_field "$B" errors) (device-sim exit status $BENCH_STATUS; kinds: $(grep -oE '"error_kinds":\{[^}]*\}' "$B" | cut -d: -f2-))
rate limit       the welcome announced ${RATE_SEEN:-no} msgs/s per device (the gateway was asked for $BENCH_TELEMETRY_RATE)
idle connect     $IDLE_LINE (device-sim exit status $IDLE_STATUS)
gateway RSS      $RSS_BEFORE KiB before, $RSS_AFTER KiB with the idle connections open
RSS per idle     $RSS_PER_CONN KiB per connection (device-sim itself: $SIM_RSS KiB for its $IDLE_CONNECTED)
disk fsync       $FSYNC_MS ms per 4 KiB O_DSYNC write (dd, 200 writes, $FS_TYPE at $TMP)
gateway exit     $GATEWAY_STATUS after SIGTERM
EOF
