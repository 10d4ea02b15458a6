#!/usr/bin/env bash
# First benchmark of the gateway, on this machine, against 127.0.0.1 only:
#   1. throughput and ack latency of durable telemetry (device-sim bench),
#   2. gateway memory per idle connection (device-sim idle, VmRSS before/after),
#   3. the disk's fsync latency, the floor under every durable ack.
# The machine is shared and noisy, so the headline numbers are also reported as ratios against
# a peer measured in the same run: bench/peers/node-ws, a reference gateway written the way the
# classic Node.js `ws` server example does it (same certificates, same SQLite durability:
# WAL + synchronous=FULL, ack after COMMIT). The two systems are loaded one after the other,
# never at the same time, in the order ours/peer for the bench and peer/ours for idle (ABBA),
# so that slow drift of the machine does not favour either.
# Each system runs from a fresh temporary directory (database; the gateway's also holds the
# development certificates, which the peer uses too) that is removed at the end.
# Everything stops by itself; every wait has a time limit.
#
# Knobs (environment): BENCH_DEVICES (100), BENCH_INFLIGHT (8), BENCH_DURATION (20s),
# BENCH_WARMUP (2s), IDLE_DEVICES (5000), BENCH_TELEMETRY_RATE (per-device telemetry rate
# limit for the gateway, default 1000000 so that the limit does not cap the measurement),
# BENCH_TMPDIR (where the temporary directories go; default $TMPDIR or /tmp),
# BENCH_PEERS (node-ws, the default, or none to measure the gateway alone).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DEVICES=${BENCH_DEVICES:-100}
BENCH_INFLIGHT=${BENCH_INFLIGHT:-8}
BENCH_DURATION=${BENCH_DURATION:-20s}
BENCH_WARMUP=${BENCH_WARMUP:-2s}
IDLE_DEVICES=${IDLE_DEVICES:-5000}
BENCH_TELEMETRY_RATE=${BENCH_TELEMETRY_RATE:-1000000}
BENCH_PEERS=${BENCH_PEERS:-node-ws}
PEER_DIR=$ROOT/bench/peers/node-ws
TMP_BASE=${BENCH_TMPDIR:-${TMPDIR:-/tmp}}

log() { printf '[first.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

case $BENCH_PEERS in
    node-ws) SYSTEMS=(ours peer) ;;
    none) SYSTEMS=(ours) ;;
    *) die "BENCH_PEERS must be node-ws or none, not '$BENCH_PEERS'" ;;
esac

# Per system ("ours", "peer"): R[$sys.pid], .dir, .device, .api, .key, .tokens, and the results.
declare -A R=()
IDLE_PID=""
TMP=""
PEER_TMP=""

# Stops what this script started (by pid, never by name) and removes the temporary directories.
cleanup() {
    local status=$? sys
    exec 3>&- 2>/dev/null || true
    if [[ -n $IDLE_PID ]]; then
        kill -TERM "$IDLE_PID" 2>/dev/null || true
        wait_for_exit "$IDLE_PID" 15
    fi
    for sys in "${SYSTEMS[@]}"; do
        if [[ -n ${R[$sys.pid]:-} ]]; then
            kill -TERM "${R[$sys.pid]}" 2>/dev/null || true
            wait_for_exit "${R[$sys.pid]}" 20
        fi
        if [[ $status -ne 0 && -f ${R[$sys.dir]:-/nonexistent}/server.log ]]; then
            log "last lines of the $sys server's log:"
            tail -n 20 "${R[$sys.dir]}/server.log" >&2 || true
        fi
    done
    [[ -n $TMP ]] && rm -rf "$TMP"
    [[ -n $PEER_TMP ]] && rm -rf "$PEER_TMP"
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

new_key() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# endpoints SYS: waits for the server's `listening` line and records its URLs.
endpoints() {
    local sys=$1 dir=${R[$1.dir]} line
    wait_for_line "$dir/server.out" '^listening ' 60 "${R[$sys.pid]}"
    line=$(grep -m1 '^listening ' "$dir/server.out")
    R[$sys.device]=$(sed -nE 's/.* device=([^ ]+).*/\1/p' <<<"$line")
    R[$sys.api]=$(sed -nE 's/.* api=([^ ]+).*/\1/p' <<<"$line")
    [[ ${R[$sys.device]} =~ ^wss?://127\.0\.0\.1:[0-9]+/ ]] || die "unexpected device URL in: $line"
    [[ ${R[$sys.api]} =~ ^http://127\.0\.0\.1:[0-9]+/ ]] || die "unexpected API URL in: $line"
    R[$sys.tokens]=$dir/data/sim-tokens.json
    log "$sys pid ${R[$sys.pid]}: device=${R[$sys.device]} api=${R[$sys.api]}"
}

# sim_env SYS: points device-sim at SYS (call in a subshell; the key stays off command lines).
sim_env() {
    export DEVICE_SIM_URL=${R[$1.device]} GATEWAY_API_URL=${R[$1.api]} GATEWAY_API_KEY=${R[$1.key]}
    SIM=("$SIM_BIN" --ca "$TMP/certs/ca.pem" --tokens "${R[$1.tokens]}")
}

# --- build ------------------------------------------------------------------------------
log "building (release)"
(cd "$ROOT" && cargo build --release -p gateway -p device-sim)
GATEWAY_BIN=$ROOT/target/release/gateway
SIM_BIN=$ROOT/target/release/device-sim
[[ -x $GATEWAY_BIN && -x $SIM_BIN ]] || die "release binaries missing"

if [[ $BENCH_PEERS == node-ws ]]; then
    command -v node >/dev/null && command -v npm >/dev/null \
        || die "the node-ws peer needs node and npm (or run with BENCH_PEERS=none)"
    if [[ ! -d $PEER_DIR/node_modules/ws || ! -d $PEER_DIR/node_modules/better-sqlite3 ]]; then
        log "installing the node-ws peer's dependencies"
        if [[ -f $PEER_DIR/package-lock.json ]]; then
            (cd "$PEER_DIR" && timeout 900 npm ci --no-audit --no-fund >&2)
        else
            (cd "$PEER_DIR" && timeout 900 npm install --no-audit --no-fund >&2)
        fi
    fi
fi

# --- start the gateway ------------------------------------------------------------------
TMP=$(mktemp -d "$TMP_BASE/gateway-bench.XXXXXX")
mkdir -p "$TMP/data"
R[ours.dir]=$TMP
R[ours.key]=$(new_key)

log "starting the gateway in $TMP"
(
    cd "$TMP"
    # The per-device telemetry rate limit would otherwise cap throughput at 100 msgs/s per device.
    export GATEWAY_TELEMETRY_RATE=$BENCH_TELEMETRY_RATE GATEWAY_TELEMETRY_BURST=$BENCH_TELEMETRY_RATE
    exec "$GATEWAY_BIN" --device-addr 127.0.0.1:0 --api-addr 127.0.0.1:0 \
        --database-url "sqlite://$TMP/data/gateway.db" --api-key "${R[ours.key]}"
) >"$TMP/server.out" 2>"$TMP/server.log" &
R[ours.pid]=$!
endpoints ours
[[ -f $TMP/certs/ca.pem || ${R[ours.device]} == ws://* ]] || die "no development CA at $TMP/certs/ca.pem"

# --- start the peer, with the gateway's development certificates ------------------------
if [[ $BENCH_PEERS == node-ws ]]; then
    [[ -f $TMP/certs/server.pem && -f $TMP/certs/server-key.pem ]] \
        || die "the node-ws peer needs the gateway's development certificates in $TMP/certs"
    PEER_TMP=$(mktemp -d "$TMP_BASE/node-ws-bench.XXXXXX")
    mkdir -p "$PEER_TMP/data"
    R[peer.dir]=$PEER_TMP
    R[peer.key]=$(new_key)
    log "starting the node-ws peer in $PEER_TMP"
    (
        cd "$PEER_TMP"
        export PEER_API_KEY=${R[peer.key]}
        exec node "$PEER_DIR/server.js" --cert "$TMP/certs/server.pem" --key "$TMP/certs/server-key.pem" \
            --database "$PEER_TMP/data/peer.db" --device-addr 127.0.0.1:0 --api-addr 127.0.0.1:0
    ) >"$PEER_TMP/server.out" 2>"$PEER_TMP/server.log" &
    R[peer.pid]=$!
    endpoints peer
fi

# --- provision --------------------------------------------------------------------------
for sys in "${SYSTEMS[@]}"; do
    log "$sys: provisioning $IDLE_DEVICES devices"
    start=$(date +%s.%N)
    (sim_env "$sys" && exec timeout 300 "${SIM[@]}" provision --devices "$IDLE_DEVICES")
    R[$sys.provision_s]=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
done

# --- throughput and latency -------------------------------------------------------------
# bench SYS: device-sim bench against SYS, the JSON in its directory.
bench() {
    local sys=$1 status=0
    log "$sys: bench: $BENCH_DEVICES devices x $BENCH_INFLIGHT in flight, $BENCH_DURATION after $BENCH_WARMUP warm-up"
    (sim_env "$sys" && exec timeout 600 "${SIM[@]}" bench --devices "$BENCH_DEVICES" --inflight "$BENCH_INFLIGHT" \
        --duration "$BENCH_DURATION" --warmup "$BENCH_WARMUP" --json) >"${R[$sys.dir]}/bench.json" || status=$?
    # Status 2: the benchmark ran but saw errors (reported below); anything else: it did not run.
    [[ $status -eq 0 || $status -eq 2 ]] || die "device-sim bench against $sys failed (status $status)"
    R[$sys.bench_status]=$status
}

# --- memory per idle connection ---------------------------------------------------------
# idle SYS: VmRSS of SYS before and with IDLE_DEVICES idle connections open.
idle() {
    local sys=$1 dir=${R[$1.dir]} pid=${R[$1.pid]} line
    sleep 2
    R[$sys.rss_before]=$(rss_kib "$pid")
    log "$sys: idle: $IDLE_DEVICES connections (VmRSS before: ${R[$sys.rss_before]} KiB)"
    mkfifo "$dir/idle.stdin"
    (sim_env "$sys" && exec timeout 900 "${SIM[@]}" idle --devices "$IDLE_DEVICES" --hold 10m) \
        <"$dir/idle.stdin" >"$dir/idle.out" 2>"$dir/idle.log" &
    IDLE_PID=$!
    # Holding the fifo's write end open keeps idle running; closing it tells idle to finish.
    exec 3>"$dir/idle.stdin"
    wait_for_line "$dir/idle.out" '^connected ' 300 "$IDLE_PID"
    line=$(grep -m1 '^connected ' "$dir/idle.out")
    R[$sys.idle_line]=$line
    R[$sys.idle_connected]=$(awk '{ print $2 }' <<<"$line")
    sleep 3
    R[$sys.rss_after]=$(rss_kib "$pid")
    # The simulator's own footprint (timeout's child), for the record.
    R[$sys.sim_rss]=$(rss_kib "$(pgrep -P "$IDLE_PID" | head -n1)" 2>/dev/null || echo "?")
    exec 3>&-
    wait_for_exit "$IDLE_PID" 30
    R[$sys.idle_status]=$EXIT_STATUS
    IDLE_PID=""
    if [[ ${R[$sys.idle_connected]} -gt 0 ]]; then
        R[$sys.rss_per_conn]=$(awk -v a="${R[$sys.rss_before]}" -v b="${R[$sys.rss_after]}" \
            -v n="${R[$sys.idle_connected]}" 'BEGIN { printf "%.1f", (b - a) / n }')
    else
        R[$sys.rss_per_conn]="n/a"
    fi
}

# ABBA: the bench in the order ours, peer; idle in the order peer, ours.
for sys in "${SYSTEMS[@]}"; do bench "$sys"; done
for ((i = ${#SYSTEMS[@]} - 1; i >= 0; i--)); do idle "${SYSTEMS[i]}"; done

# --- disk fsync latency -----------------------------------------------------------------
FS_TYPE=$(stat -f -c %T "$TMP")
DD_OUT=$(LC_ALL=C dd if=/dev/zero of="$TMP/fsync.probe" bs=4k count=200 oflag=dsync 2>&1)
DD_S=$(tail -n1 <<<"$DD_OUT" | sed -nE 's/.*copied, ([0-9.]+) s.*/\1/p')
FSYNC_MS=$(awk -v s="${DD_S:-0}" 'BEGIN { printf "%.3f", s * 1000 / 200 }')
rm -f "$TMP/fsync.probe"

# --- stop the servers -------------------------------------------------------------------
for sys in "${SYSTEMS[@]}"; do
    kill -TERM "${R[$sys.pid]}"
    wait_for_exit "${R[$sys.pid]}" 30
    R[$sys.exit]=$EXIT_STATUS
    [[ ${R[$sys.exit]} != 137 ]] || R[$sys.exit]="137 (still running 30 s after SIGTERM: killed)"
    R[$sys.pid]=""
done

# --- summary ----------------------------------------------------------------------------
# report SYS LABEL: the detailed numbers of one system.
report() {
    local sys=$1 B=${R[$1.dir]}/bench.json rate
    rate=$(json_field "$B" telemetry_per_sec_limit || true)
    rate=${rate%.0}
    cat <<EOF
-- $2
provision        $IDLE_DEVICES devices in ${R[$sys.provision_s]}s
throughput       $(json_field "$B" msgs_per_sec) msgs/s acked ($(json_field "$B" connected)/$BENCH_DEVICES devices x $BENCH_INFLIGHT in flight, ~$(json_field "$B" payload_bytes)-byte messages, $BENCH_DURATION after $BENCH_WARMUP warm-up)
ack latency      p50 $(json_field "$B" p50_ms) ms  p90 $(json_field "$B" p90_ms) ms  p99 $(json_field "$B" p99_ms) ms  max $(json_field "$B" max_ms) ms
bench errors     $(json_field "$B" errors) (device-sim exit status ${R[$sys.bench_status]}; kinds: $(grep -oE '"error_kinds":\{[^}]*\}' "$B" | cut -d: -f2-))
rate limit       the welcome announced ${rate:-no} msgs/s per device$([[ $sys == ours ]] && echo " (the gateway was asked for $BENCH_TELEMETRY_RATE)")
idle connect     ${R[$sys.idle_line]} (device-sim exit status ${R[$sys.idle_status]})
server RSS       ${R[$sys.rss_before]} KiB before, ${R[$sys.rss_after]} KiB with the idle connections open
RSS per idle     ${R[$sys.rss_per_conn]} KiB per connection (device-sim itself: ${R[$sys.sim_rss]} KiB for its ${R[$sys.idle_connected]})
server exit      ${R[$sys.exit]} after SIGTERM
EOF
}

# ratio A B: A/B with two decimals, or n/a.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else print "n/a" }'; }

echo
echo "== first benchmark: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, servers and simulator on the same machine, one system loaded at a time =="
report ours "ours: gateway"
if [[ $BENCH_PEERS == node-ws ]]; then
    report peer "peer: node-ws (bench/peers/node-ws: node $(node --version), ws + better-sqlite3, WAL, synchronous=FULL)"
    O=$TMP/bench.json P=$PEER_TMP/bench.json
    row() { printf '%-26s | %14s | %14s | %s\n' "$@"; }
    echo
    echo "-- side by side (ratio: >1 means ours is better; msgs/s ours/peer, latency, RSS and provision time peer/ours)"
    row metric ours "node ws peer" ratio
    row "acked msgs/s" "$(json_field "$O" msgs_per_sec)" "$(json_field "$P" msgs_per_sec)" \
        "$(ratio "$(json_field "$O" msgs_per_sec)" "$(json_field "$P" msgs_per_sec)")"
    for q in p50 p90 p99; do
        row "ack latency $q (ms)" "$(json_field "$O" ${q}_ms)" "$(json_field "$P" ${q}_ms)" \
            "$(ratio "$(json_field "$P" ${q}_ms)" "$(json_field "$O" ${q}_ms)")"
    done
    row "RSS per idle conn (KiB)" "${R[ours.rss_per_conn]}" "${R[peer.rss_per_conn]}" \
        "$(ratio "${R[peer.rss_per_conn]}" "${R[ours.rss_per_conn]}")"
    row "provision $IDLE_DEVICES (s)" "${R[ours.provision_s]}" "${R[peer.provision_s]}" \
        "$(ratio "${R[peer.provision_s]}" "${R[ours.provision_s]}")"
    row "bench errors" "$(json_field "$O" errors)" "$(json_field "$P" errors)" ""
    row "idle connected" "${R[ours.idle_connected]}/$IDLE_DEVICES" "${R[peer.idle_connected]}/$IDLE_DEVICES" ""
fi
echo
echo "disk fsync       $FSYNC_MS ms per 4 KiB O_DSYNC write (dd, 200 writes, $FS_TYPE at $TMP)"
