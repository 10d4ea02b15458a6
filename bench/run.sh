#!/usr/bin/env bash
# The benchmark suite of issue 7: our gateway against its peers, side by side, on this machine,
# in one invocation, 127.0.0.1 only. One system is loaded at a time. Prints one table: our
# figure, each peer's, and our ratio to each (ours / peer), then the issue's targets and whether
# they hold. docs/benchmarks.md says what each scenario does and shows a run.
#
#   bash bench/run.sh                 # everything: 8 to 20 minutes, with the machine
#   INGEST_DURATION=5 FLEET_DEVICES=2000 CMD_COMMANDS=200 bash bench/run.sh   # a quick look
#
# Systems: ours (the gateway, release build), node (bench/peers/node-ws: ws + better-sqlite3 12
# + node's https, the reference gateway), mosquitto (Debian's 2.0, MQTT QoS 1 over a TLS
# WebSocket, nothing stored: the transport ceiling; ingest only). All use the same development
# certificates, which the gateway makes on its first start in the temporary directory.
# Scenarios:
#   fsync     the disk's fsync latency (dd, 4 KiB O_DSYNC writes), printed with every run
#   ingest    INGEST_DEVICES devices x INGEST_INFLIGHT in flight, ~200-byte JSON, INGEST_DURATION s
#             after INGEST_WARMUP s: acked msgs/s, ack latency p50/p99, server CPU per acked
#             message (utime+stime of the server process over the window); synchronous=FULL on
#             ours and node, then NORMAL on both, and Mosquitto
#   commands  CMD_COMMANDS `ping` commands with wait_s over CMD_DEVICES online devices,
#             CMD_CONCURRENCY operators (1: one command at a time), without and with background
#             telemetry from BG_DEVICES devices at half of our measured FULL peak
#   idle      FLEET_DEVICES idle TLS connections from FLEET_PROCESSES device-sim processes:
#             server RSS per connection (VmRSS delta / N) and the time to connect them all
#   storm     the same fleet as reconnecting devices (`device-sim run --rate 0 --processes
#             FLEET_PROCESSES`), the server restarted (SIGTERM, then started again on the same
#             data and ports): time until all are online again (the server's gauge), and
#             client-side connect errors by kind (with the first error text of each kind, and
#             the server's handshake outcomes since the restart, in the log); failed handshakes
#             are counted apart for the fleet's first connect and after the restart (the fleet
#             prints its errors so far on SIGUSR1, sent just before the restart)
#   storm held  the same again with the device socket held across the restart, as systemd
#             socket activation holds it (bench/hold-listener.py: LISTEN_FDS, SIGHUP restarts the
#             server): devices that reconnect meanwhile wait in the accept queue, not refused.
#             Both storms also report the CPU seconds the new server and the fleet's processes
#             used until all were online again: on two cores the two share them.
#
# Knobs (environment): SCENARIOS ("ingest commands idle storm"), PEERS ("node mosquitto"),
# INGEST_DURATION (30), INGEST_WARMUP (2), INGEST_DEVICES (100), INGEST_INFLIGHT (8),
# PAYLOAD_BYTES (200), CMD_COMMANDS (1000), CMD_DEVICES (100), CMD_CONCURRENCY (1),
# CMD_WAIT_S (10), BG_DEVICES (100), BG_RATE (msgs/s per background device; default: half our
# FULL peak / BG_DEVICES, or 50 without the ingest scenario), FLEET_DEVICES (19000),
# FLEET_PROCESSES (4), FLEET_CONNECT_CONCURRENCY (250 per process), STORM_CONNECT_CONCURRENCY
# (1000 in all, spread over the FLEET_PROCESSES processes), STORM_TIMEOUT (120 s), STORM_HELD
# (1: also the storm with the socket held; 0: not), BENCH_TMPDIR (default $TMPDIR or /tmp), CARGO_TARGET_DIR.
# Everything started here is stopped (by pid) and the temporary directory removed at the end,
# also on Ctrl-C or failure; every wait has a time limit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCENARIOS=${SCENARIOS:-ingest commands idle storm}
PEERS=${PEERS-node mosquitto}
INGEST_DURATION=${INGEST_DURATION:-30}
INGEST_WARMUP=${INGEST_WARMUP:-2}
INGEST_DEVICES=${INGEST_DEVICES:-100}
INGEST_INFLIGHT=${INGEST_INFLIGHT:-8}
PAYLOAD_BYTES=${PAYLOAD_BYTES:-200}
CMD_COMMANDS=${CMD_COMMANDS:-1000}
CMD_DEVICES=${CMD_DEVICES:-100}
CMD_CONCURRENCY=${CMD_CONCURRENCY:-1}
CMD_WAIT_S=${CMD_WAIT_S:-10}
BG_DEVICES=${BG_DEVICES:-100}
# Seconds the background streams before the commands start (passed to bench-commands).
BG_WARMUP=2
BG_RATE=${BG_RATE:-}
FLEET_DEVICES=${FLEET_DEVICES:-19000}
FLEET_PROCESSES=${FLEET_PROCESSES:-4}
FLEET_CONNECT_CONCURRENCY=${FLEET_CONNECT_CONCURRENCY:-250}
STORM_CONNECT_CONCURRENCY=${STORM_CONNECT_CONCURRENCY:-1000}
STORM_TIMEOUT=${STORM_TIMEOUT:-120}
STORM_HELD=${STORM_HELD:-1}
TMP_BASE=${BENCH_TMPDIR:-${TMPDIR:-/tmp}}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
NODE_PEER=$ROOT/bench/peers/node-ws
MOSQUITTO_CONF=$ROOT/bench/peers/mosquitto/mosquitto.conf.in

log() { printf '[run.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
has() { [[ " $1 " == *" $2 "* ]]; }

((${INGEST_DURATION:-30} >= 2)) || { echo "INGEST_DURATION must be at least 2" >&2; exit 1; }
for n in INGEST_DURATION INGEST_WARMUP INGEST_DEVICES INGEST_INFLIGHT CMD_COMMANDS CMD_DEVICES \
    CMD_CONCURRENCY FLEET_DEVICES FLEET_PROCESSES STORM_TIMEOUT; do
    [[ ${!n} =~ ^[0-9]+$ && ${!n} -gt 0 ]] || die "$n must be a positive whole number, not '${!n}'"
done
for s in $SCENARIOS; do has "ingest commands idle storm" "$s" || die "unknown scenario '$s'"; done
for p in $PEERS; do has "node mosquitto" "$p" || die "unknown peer '$p'"; done

TMP=$(mktemp -d "$TMP_BASE/gateway-suite.XXXXXX")
CERTS=$TMP/certs
# Processes started here, by pid (servers and load generators).
declare -A RUNNING=()
# Results: R[key.field].
declare -A R=()

# wait_for_exit PID SECONDS: waits for our child PID, SIGKILLing it after SECONDS; sets EXIT_STATUS.
EXIT_STATUS=0
wait_for_exit() {
    local pid=$1 watchdog
    (sleep "$2" && kill -KILL "$pid" 2>/dev/null) &
    watchdog=$!
    EXIT_STATUS=0
    wait "$pid" 2>/dev/null || EXIT_STATUS=$?
    # Its sleep first: left running, it would keep this script's stdout open (a `| tee` would
    # wait for it) and could later kill a process that reused PID.
    pkill -P "$watchdog" sleep 2>/dev/null || true
    kill "$watchdog" 2>/dev/null || true
    wait "$watchdog" 2>/dev/null || true
    unset "RUNNING[$pid]"
}

# stop PID SECONDS: SIGTERM, then waits (SIGKILL after SECONDS).
stop() {
    kill -TERM "$1" 2>/dev/null || true
    wait_for_exit "$1" "$2"
}

cleanup() {
    local status=$? pid
    trap - EXIT INT TERM
    for pid in "${!RUNNING[@]}"; do
        log "stopping ${RUNNING[$pid]} (pid $pid)"
        stop "$pid" 20
    done
    rm -rf "$TMP"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for_line FILE PATTERN SECONDS PID: until FILE has a line matching PATTERN; fails early if
# PID exits.
wait_for_line() {
    local status=0
    python3 "$ROOT/bench/wait.py" line "$@" || status=$?
    case $status in
        0) ;;
        3) tail -n 5 "${1%.*}.log" "$1" >&2 2>/dev/null || true
           die "process $4 exited before printing /$2/ to $1" ;;
        4) die "no /$2/ in $1 after $3 s" ;;
        *) die "bench/wait.py line failed ($status)" ;;
    esac
}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat).
cpu_ticks() { sed -E 's/^.*\) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
# tree_ticks PID: cpu_ticks of PID and of all its live descendants, together.
tree_ticks() {
    local pid ticks total=0
    for pid in $1 $(descendants "$1"); do
        ticks=$(cpu_ticks "$pid" 2>/dev/null) # empty if it has just exited
        total=$((total + ${ticks:-0}))
    done
    echo "$total"
}
descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done; }
# The whole machine's busy and total clock ticks, all CPUs together (/proc/stat; time stolen by
# the host counts in the total, not as busy).
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; exit }' /proc/stat; }
CLK_TCK=$(getconf CLK_TCK)
json_field() { grep -oE "\"$2\":[-0-9.eE+]+" "$1" | head -n1 | cut -d: -f2; }
new_key() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- build and prerequisites ----------------------------------------------------------------
log "building the release binaries (target dir $TARGET_DIR)"
(cd "$ROOT" && cargo build --release -p gateway -p device-sim >&2)
GATEWAY_BIN=$TARGET_DIR/release/gateway
SIM_BIN=$TARGET_DIR/release/device-sim
[[ -x $GATEWAY_BIN && -x $SIM_BIN ]] || die "release binaries missing in $TARGET_DIR/release"
if has "$PEERS" node; then
    command -v node >/dev/null || die "the node peer needs node (or PEERS without node)"
    if [[ ! -d $NODE_PEER/node_modules/ws || ! -d $NODE_PEER/node_modules/better-sqlite3 ]]; then
        log "installing the node peer's dependencies (npm ci; building better-sqlite3 can take minutes)"
        (cd "$NODE_PEER" && timeout 1200 npm ci --no-audit --no-fund >&2)
    fi
fi
if has "$PEERS" mosquitto; then
    command -v mosquitto >/dev/null || die "the mosquitto peer needs mosquitto (apt-get install mosquitto)"
fi
# Servers hold one file per connection: up to the hard limit (the fleet needs 19,000 and more).
ulimit -n "$(ulimit -Hn)"
if has "$SCENARIOS" idle || has "$SCENARIOS" storm; then
    (($(ulimit -n) > FLEET_DEVICES + 100)) \
        || die "open-files limit $(ulimit -n) is too small for FLEET_DEVICES=$FLEET_DEVICES"
fi

# --- servers --------------------------------------------------------------------------------
# S[sys.pid], .device (URL), .api (URL), .root (API root), .key, .dir, .device_addr, .api_addr
declare -A S=()

# listening_lines DIR: how many `listening` lines the server in DIR has printed so far.
listening_lines() { grep -c '^listening ' "$1/server.out" 2>/dev/null || true; }

# wait_listening SYS BEFORE: until SYS's server prints a listening line after the first BEFORE;
# dies (with the tail of its log) if the process S[SYS.pid] exits or 60 s pass.
wait_listening() {
    local sys=$1 before=$2 dir=${S[$1.dir]} deadline=$((SECONDS + 60))
    until (($(listening_lines "$dir") > before)); do
        kill -0 "${S[$sys.pid]}" 2>/dev/null || { tail -n 20 "$dir/server.log" >&2; die "$sys server exited at start"; }
        ((SECONDS < deadline)) || { tail -n 20 "$dir/server.log" >&2; die "$sys server printed no listening line in 60 s"; }
        sleep 0.02
    done
}

# start SYS DIR SYNCHRONOUS [DEVICE_ADDR API_ADDR [held]]: starts ours or node with its data in DIR.
start() {
    local sys=$1 dir=$2 sync=$3 daddr=${4:-127.0.0.1:0} aaddr=${5:-127.0.0.1:0} line launcher=()
    mkdir -p "$dir"
    # held: the device socket is bound by bench/hold-listener.py and handed to the server.
    [[ ${6:-} != held ]] || launcher=(python3 "$ROOT/bench/hold-listener.py" "$daddr" --)
    [[ -n ${S[$sys.key]:-} && ${S[$sys.dir]:-} == "$dir" ]] || S[$sys.key]=$(new_key)
    S[$sys.dir]=$dir
    local before
    before=$(listening_lines "$dir")
    case $sys in
        ours)
            (
                cd "$TMP" # the development certificates live in $TMP/certs
                export GATEWAY_API_KEY=${S[ours.key]}
                # The per-device rate limit would otherwise cap throughput at 100 msgs/s per device.
                export GATEWAY_TELEMETRY_RATE=1000000 GATEWAY_TELEMETRY_BURST=1000000
                exec "${launcher[@]}" "$GATEWAY_BIN" --device-addr "$daddr" --api-addr "$aaddr" \
                    --database-url "sqlite://$dir/gateway.db" --synchronous "$sync"
            ) >>"$dir/server.out" 2>>"$dir/server.log" &
            ;;
        node)
            (
                cd "$dir"
                export PEER_API_KEY=${S[node.key]}
                exec "${launcher[@]}" node "$NODE_PEER/server.js" --cert "$CERTS/server.pem" --key "$CERTS/server-key.pem" \
                    --database "$dir/peer.db" --device-addr "$daddr" --api-addr "$aaddr" --synchronous "$sync"
            ) >>"$dir/server.out" 2>>"$dir/server.log" &
            ;;
    esac
    S[$sys.pid]=$!
    RUNNING[${S[$sys.pid]}]="$sys server"
    wait_listening "$sys" "$before"
    line=$(grep '^listening ' "$dir/server.out" | tail -n1)
    S[$sys.device]=$(sed -nE 's/.* device=([^ ]+).*/\1/p' <<<"$line")
    S[$sys.api]=$(sed -nE 's/.* api=([^ ]+).*/\1/p' <<<"$line")
    [[ ${S[$sys.device]} =~ ^wss://127\.0\.0\.1:([0-9]+)/ ]] || die "unexpected device URL in: $line"
    S[$sys.device_addr]=127.0.0.1:${BASH_REMATCH[1]}
    [[ ${S[$sys.api]} =~ ^(http://127\.0\.0\.1:([0-9]+))/v1$ ]] || die "unexpected API URL in: $line"
    S[$sys.root]=${BASH_REMATCH[1]}
    S[$sys.api_addr]=127.0.0.1:${BASH_REMATCH[2]}
    log "$sys ($sync) pid ${S[$sys.pid]}: ${S[$sys.device]} ${S[$sys.api]}"
}

# halt SYS: SIGTERM and wait (killed after 60 s); sets HALT_S (seconds to exit) and EXIT_STATUS.
halt() {
    local t
    t=$(now)
    stop "${S[$1.pid]}" 60
    HALT_S=$(since "$t")
    [[ $EXIT_STATUS -eq 0 ]] || log "warning: $1 server exited with status $EXIT_STATUS"
    S[$1.pid]=""
}

# sim SYS ARGS...: device-sim pointed at SYS (run it in a subshell or with exec).
sim() {
    local sys=$1
    shift
    if [[ $sys == mosquitto ]]; then
        exec "$SIM_BIN" --url "${S[mosquitto.device]}" --ca "$CERTS/ca.pem" "$@"
    fi
    export DEVICE_SIM_URL=${S[$sys.device]} GATEWAY_API_URL=${S[$sys.api]} GATEWAY_API_KEY=${S[$sys.key]}
    exec "$SIM_BIN" --ca "$CERTS/ca.pem" --tokens "${S[$sys.dir]}/tokens.json" "$@"
}

start_mosquitto() {
    local dir=$TMP/mosquitto plain ws
    mkdir -p "$dir"
    plain=$(free_port)
    ws=$(free_port)
    sed -e "s|@USER@|$(id -un)|" -e "s|@PLAIN_PORT@|$plain|" -e "s|@WS_PORT@|$ws|" -e "s|@CERTS@|$CERTS|" \
        "$MOSQUITTO_CONF" >"$dir/mosquitto.conf"
    (exec mosquitto -c "$dir/mosquitto.conf") >"$dir/server.out" 2>"$dir/server.log" &
    S[mosquitto.pid]=$!
    RUNNING[${S[mosquitto.pid]}]="mosquitto"
    local deadline=$((SECONDS + 30))
    until (exec 3<>"/dev/tcp/127.0.0.1/$ws") 2>/dev/null; do
        kill -0 "${S[mosquitto.pid]}" 2>/dev/null || { cat "$dir/server.log" >&2; die "mosquitto exited at start"; }
        ((SECONDS < deadline)) || die "mosquitto is not listening on $ws after 30 s"
        sleep 0.05
    done
    S[mosquitto.device]=wss://127.0.0.1:$ws/mqtt
    log "mosquitto $(mosquitto -h 2>/dev/null | sed -nE '1s/.*version ([0-9.]+).*/\1/p') pid ${S[mosquitto.pid]}: ${S[mosquitto.device]}"
}

# online SYS: the server's count of connected devices (its /metrics gauge gateway_connections).
online() {
    curl -sf --max-time 2 "${S[$1.root]}/metrics" 2>/dev/null | awk '/^gateway_connections / { print $2; f = 1 } END { if (!f) print -1 }'
}

# --- the development certificates -----------------------------------------------------------
log "temporary directory $TMP"
start ours "$TMP/certs-maker" full
[[ -f $CERTS/ca.pem && -f $CERTS/server.pem && -f $CERTS/server-key.pem ]] \
    || die "the gateway made no development certificates in $CERTS"
halt ours

# --- fsync ----------------------------------------------------------------------------------
fsync_probe() {
    local out s
    out=$(LC_ALL=C dd if=/dev/zero of="$TMP/fsync.probe" bs=4k count=500 oflag=dsync 2>&1)
    s=$(tail -n1 <<<"$out" | sed -nE 's/.*copied, ([0-9.e-]+) s.*/\1/p')
    rm -f "$TMP/fsync.probe"
    awk -v s="${s:-0}" 'BEGIN { printf "%.3f", s * 1000 / 500 }'
}
R[fsync.before]=$(fsync_probe)
log "fsync: ${R[fsync.before]} ms per 4 KiB O_DSYNC write ($(stat -f -c %T "$TMP") at $TMP)"

# --- ingest ---------------------------------------------------------------------------------
# ingest KEY SYS: device-sim bench (bench-mqtt for mosquitto) against the running SYS; the server's
# CPU time is read at the start and the end of the measurement window.
ingest() {
    local key=$1 sys=$2 out=$TMP/$1 pid=${S[$2.pid]} c0 c1 s0 s1 sim_pid cmd=(bench --provision)
    [[ $sys == mosquitto ]] && cmd=(bench-mqtt)
    log "ingest $key: $INGEST_DEVICES devices x $INGEST_INFLIGHT in flight, ${INGEST_DURATION}s after ${INGEST_WARMUP}s"
    (sim "$sys" "${cmd[@]}" --devices "$INGEST_DEVICES" --inflight "$INGEST_INFLIGHT" \
        --duration "${INGEST_DURATION}s" --warmup "${INGEST_WARMUP}s" --payload-bytes "$PAYLOAD_BYTES" --json) \
        >"$out.json" 2>"$out.log" &
    sim_pid=$!
    RUNNING[$sim_pid]="device-sim ($key)"
    wait_for_line "$out.log" ' connected to ' 120 "$sim_pid"
    # The load starts 100 ms after that line; the window opens after the warm-up.
    sleep "$(awk -v w="$INGEST_WARMUP" 'BEGIN { print w + 0.1 }')"
    c0=$(cpu_ticks "$pid") s0=$(cpu_ticks "$sim_pid")
    # device-sim exits as soon as its window closes: its share is taken a second early.
    sleep $((INGEST_DURATION - 1))
    s1=$(cpu_ticks "$sim_pid")
    sleep 1
    c1=$(cpu_ticks "$pid")
    wait_for_exit "$sim_pid" $((INGEST_DURATION + 60))
    [[ $EXIT_STATUS -eq 0 || $EXIT_STATUS -eq 2 ]] || { tail -n 20 "$out.log" >&2; die "ingest $key: device-sim failed ($EXIT_STATUS)"; }
    R[$key.msgs]=$(json_field "$out.json" msgs_per_sec)
    R[$key.p50]=$(json_field "$out.json" p50_ms)
    R[$key.p99]=$(json_field "$out.json" p99_ms)
    R[$key.errors]=$(json_field "$out.json" errors)
    local acked
    acked=$(json_field "$out.json" acked)
    R[$key.cpu_us]=$(awk -v t=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$acked" \
        'BEGIN { if (n > 0) printf "%.1f", t / hz * 1e6 / n; else print "n/a" }')
    R[$key.cpu_share]=$(awk -v t=$((c1 - c0)) -v hz="$CLK_TCK" -v d="$INGEST_DURATION" 'BEGIN { printf "%.2f", t / hz / d }')
    # The load generator's share of the two cores, for reading the figures (not a result).
    R[$key.sim_share]=$(awk -v t=$((s1 - s0)) -v hz="$CLK_TCK" -v d=$((INGEST_DURATION - 1)) 'BEGIN { printf "%.2f", t / hz / d }')
    log "ingest $key: ${R[$key.msgs]} msgs/s, p50 ${R[$key.p50]} ms, p99 ${R[$key.p99]} ms, ${R[$key.cpu_us]} µs CPU/msg (${R[$key.cpu_share]} cores; device-sim ${R[$key.sim_share]} cores), errors ${R[$key.errors]}"
}

if has "$SCENARIOS" ingest; then
    for sync in full normal; do
        for sys in ours node; do
            [[ $sys == ours ]] || has "$PEERS" "$sys" || continue
            start "$sys" "$TMP/ingest-$sys-$sync" "$sync"
            ingest "ingest_${sync}.$sys" "$sys"
            # One key per cell: ingest_full.ours.msgs and so on.
            for f in msgs p50 p99 errors cpu_us cpu_share sim_share; do R[ingest_$sync.$f.$sys]=${R[ingest_${sync}.$sys.$f]}; done
            halt "$sys"
        done
        if [[ $sync == full ]] && has "$PEERS" mosquitto; then
            start_mosquitto
            ingest ingest_full.mosquitto mosquitto
            for f in msgs p50 p99 errors cpu_us cpu_share sim_share; do R[ingest_full.$f.mosquitto]=${R[ingest_full.mosquitto.$f]}; done
            stop "${S[mosquitto.pid]}" 20
        fi
    done
fi

# --- commands -------------------------------------------------------------------------------
if [[ -z $BG_RATE ]]; then
    if [[ -n ${R[ingest_full.msgs.ours]:-} ]]; then
        BG_RATE=$(awk -v p="${R[ingest_full.msgs.ours]}" -v n="$BG_DEVICES" 'BEGIN { printf "%.1f", p / 2 / n }')
    else
        BG_RATE=50
    fi
fi
BG_TOTAL=$(awk -v r="$BG_RATE" -v n="$BG_DEVICES" 'BEGIN { printf "%.0f", r * n }')

# commands NAME SYS [ARGS...]: one device-sim bench-commands run against the running SYS.
commands() {
    local name=$1 sys=$2 key=$1.$2 out=$TMP/$1.$2 pid
    shift 2
    log "commands $key: $CMD_COMMANDS over $CMD_DEVICES devices, $CMD_CONCURRENCY operators $*"
    (sim "$sys" bench-commands --devices "$CMD_DEVICES" --commands "$CMD_COMMANDS" \
        --concurrency "$CMD_CONCURRENCY" --wait-s "$CMD_WAIT_S" --json "$@") >"$out.json" 2>"$out.log" &
    pid=$!
    RUNNING[$pid]="device-sim ($key)"
    # CPU from when the commands start (the devices online, the background warmed up) until
    # device-sim exits: the server's, and the whole machine's (every process, the load
    # generator's included), to read the latencies by.
    local c0 c1 m0 m1 t0 t1
    wait_for_line "$out.log" 'devices online at' 120 "$pid"
    if [[ $* == *--background-devices* ]]; then
        wait_for_line "$out.log" 'of warm-up' 120 "$pid"
        sleep "$BG_WARMUP"
    fi
    c0=$(cpu_ticks "${S[$sys.pid]}") m0=$(machine_ticks) t0=$(now)
    # Node under half our peak as background is past its own peak: its 1,000 commands took
    # 7 minutes at 22,990 msgs/s (03:36) and more than 10 at 22,900 (04:04, cut off).
    wait_for_exit "$pid" 1500
    c1=$(cpu_ticks "${S[$sys.pid]}") m1=$(machine_ticks) t1=$(now)
    [[ $EXIT_STATUS -eq 0 || $EXIT_STATUS -eq 2 ]] || { tail -n 20 "$out.log" >&2; die "commands $key: device-sim failed ($EXIT_STATUS)"; }
    R[$name.cpu_share.$sys]=$(awk -v t=$((c1 - c0)) -v hz="$CLK_TCK" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", t / hz / (b - a) }')
    R[$name.machine.$sys]=$(awk -v m0="$m0" -v m1="$m1" -v n="$(nproc)" \
        'BEGIN { split(m0, x, " "); split(m1, y, " "); printf "%.2f", (y[1] - x[1]) / (y[2] - x[2]) * n }')
    R[$name.gw_p50.$sys]=$(json_field "$out.json" gateway_p50_ms)
    R[$name.gw_p99.$sys]=$(json_field "$out.json" gateway_p99_ms)
    R[$name.p50.$sys]=$(json_field "$out.json" p50_ms)
    R[$name.p99.$sys]=$(json_field "$out.json" p99_ms)
    R[$name.mean.$sys]=$(json_field "$out.json" mean_ms)
    R[$name.api_mean.$sys]=$(json_field "$out.json" gateway_api_mean_ms || true) # null from node
    R[$name.errors.$sys]=$(json_field "$out.json" errors)
    R[$name.bg.$sys]=$(grep -oE '"background":\{[^}]*\}' "$out.json" | grep -oE '"msgs_per_sec":[0-9.]+' | cut -d: -f2 || true)
    log "commands $key: p50 ${R[$name.p50.$sys]} ms, p99 ${R[$name.p99.$sys]} ms, errors ${R[$name.errors.$sys]}, background ${R[$name.bg.$sys]:--} msgs/s"
}

if has "$SCENARIOS" commands; then
    for sys in ours node; do
        [[ $sys == ours ]] || has "$PEERS" "$sys" || continue
        start "$sys" "$TMP/commands-$sys" full
        commands cmd_none "$sys"
        commands cmd_bg "$sys" --background-devices "$BG_DEVICES" --background-rate "$BG_RATE" --background-warmup "${BG_WARMUP}s"
        halt "$sys"
    done
fi

# --- idle fleet and reconnect storm ---------------------------------------------------------
# idle SYS: provisions the fleet, opens FLEET_DEVICES idle connections, measures, closes them.
idle() {
    local sys=$1 dir=${S[$1.dir]} pid=${S[$1.pid]} t sim_pid line
    log "idle $sys: provisioning $FLEET_DEVICES devices"
    t=$(now)
    (sim "$sys" provision --devices "$FLEET_DEVICES") >"$dir/provision.out" 2>"$dir/provision.log" &
    sim_pid=$!
    RUNNING[$sim_pid]="device-sim (provision $sys)"
    wait_for_exit "$sim_pid" 900
    [[ $EXIT_STATUS -eq 0 ]] || { tail -n 5 "$dir/provision.log" >&2; die "provisioning $sys failed"; }
    R[provision.$sys]=$(since "$t")
    sleep 2
    R[rss_before.$sys]=$(rss_kib "$pid")
    log "idle $sys: $FLEET_DEVICES connections over $FLEET_PROCESSES processes (VmRSS before ${R[rss_before.$sys]} KiB)"
    mkfifo "$dir/idle.stdin"
    (sim "$sys" --connect-concurrency "$FLEET_CONNECT_CONCURRENCY" --source-ips "127.0.0.1-127.0.0.$FLEET_PROCESSES" \
        idle --devices "$FLEET_DEVICES" --processes "$FLEET_PROCESSES" --hold 30m) \
        <"$dir/idle.stdin" >"$dir/idle.out" 2>"$dir/idle.log" &
    sim_pid=$!
    RUNNING[$sim_pid]="device-sim (idle $sys)"
    # Holding the fifo's write end open keeps idle running; closing it tells idle to finish.
    exec 3>"$dir/idle.stdin"
    wait_for_line "$dir/idle.out" '^connected ' 900 "$sim_pid"
    line=$(grep -m1 '^connected ' "$dir/idle.out")
    R[idle_line.$sys]=$line
    R[connected.$sys]=$(awk '{ print $2 }' <<<"$line")
    R[connect_s.$sys]=$(sed -nE 's/^connected [0-9]+ in ([0-9.]+)s.*/\1/p' <<<"$line")
    sleep 3
    R[rss_after.$sys]=$(rss_kib "$pid")
    R[online_idle.$sys]=$(online "$sys")
    exec 3>&-
    wait_for_exit "$sim_pid" 60
    R[rss_per_conn.$sys]=$(awk -v a="${R[rss_before.$sys]}" -v b="${R[rss_after.$sys]}" -v n="${R[connected.$sys]}" \
        'BEGIN { if (n > 0) printf "%.1f", (b - a) / n; else print "n/a" }')
    log "idle $sys: $line; VmRSS ${R[rss_before.$sys]} -> ${R[rss_after.$sys]} KiB: ${R[rss_per_conn.$sys]} KiB per connection"
}

# wait_online SYS COUNT SECONDS: until the server reports COUNT devices online; prints the
# seconds it took, or `timeout`.
wait_online() {
    python3 "$ROOT/bench/wait.py" online "${S[$1.root]}" "$2" "$3" "$(now)"
}

# tcp_counters: the kernel's TCP counters a storm may run into (listen queue overflows and
# drops, SYN cookies, resets sent), `name=value ...`, system-wide.
tcp_counters() {
    awk '$1 == "TcpExt:" { if (!h) { split($0, n); h = 1 } else for (i = 2; i <= NF; i++) v[n[i]] = $i }
        END { for (k in v) if (k ~ /^(ListenOverflows|ListenDrops|SyncookiesSent|SyncookiesRecv|SyncookiesFailed|TCPReqQFullDoCookies|TCPReqQFullDrop)$/) printf "%s=%s ", k, v[k] }' /proc/net/netstat
    awk '$1 == "Tcp:" { if (!h) { split($0, n); h = 1 } else for (i = 2; i <= NF; i++) if (n[i] == "OutRsts") printf "OutRsts=%s", $i }' /proc/net/snmp
}

# handshakes SYS: the server's handshake outcomes since it started, `outcome=count ...` (ours
# counts them at /metrics; nothing for a server that does not).
handshakes() {
    curl -sf --max-time 2 "${S[$1.root]}/metrics" 2>/dev/null \
        | sed -nE 's/^gateway_handshakes_total\{outcome="([^"]+)"\} ([0-9]+)$/\1=\2/p' | paste -sd ' ' || true
}

# errors_reported LOG: the errors by kind a `device-sim run` printed on SIGUSR1 (waits for the line).
errors_reported() {
    local log=$1 line i
    for ((i = 0; i < 300; i++)); do
        line=$(sed -nE 's/^run: at .*; errors by kind: (.*)$/\1/p' "$log" | tail -n1)
        [[ -z $line ]] || { echo "$line"; return; }
        sleep 0.1
    done
    die "the fleet did not report its errors (SIGUSR1)"
}

# failed_handshakes KINDS: the connect errors in "kind=n, ..." other than a refused TCP connect
# (expected while no server listens): each is a failed or refused handshake.
failed_handshakes() {
    (grep -oE 'connect: [^=,]+=[0-9]+' <<<"$1" || true) | (grep -v '^connect: tcp=' || true) \
        | awk -F= '{ n += $2 } END { print n + 0 }'
}

# restart_held SYS: SIGHUP to the socket holder, which stops the server and starts it again;
# sets HALT_S (the holder's time from SIGTERM to exit) and t_start (when the new one started),
# and returns once the new server prints its listening line.
restart_held() {
    local sys=$1 dir=${S[$1.dir]} stops listens deadline=$((SECONDS + 90))
    stops=$(grep -c '^hold: pid .* stopped in ' "$dir/server.log" || true)
    listens=$(listening_lines "$dir")
    kill -HUP "${S[$sys.pid]}"
    until (($(grep -c '^hold: pid .* stopped in ' "$dir/server.log" || true) > stops)); do
        ((SECONDS < deadline)) || die "$sys: the socket holder did not restart the server"
        sleep 0.02
    done
    t_start=$(now)
    HALT_S=$(grep '^hold: pid .* stopped in ' "$dir/server.log" | tail -n1 | sed -nE 's/.* stopped in ([0-9.]+) s.*/\1/p')
    wait_listening "$sys" "$listens"
}

# storm SYS [held]: the fleet as reconnecting devices; the server restarted under it (held: by
# SIGHUP to bench/hold-listener.py, which keeps the device socket open meanwhile). Results go to
# R[storm_*] (R[held_*] when held).
storm() {
    local sys=$1 mode=${2:-} dir=${S[$1.dir]} fleet_pid t_term t_start kinds handshakes before k=storm
    [[ $mode != held ]] || k=held
    local daddr=${S[$1.device_addr]} aaddr=${S[$1.api_addr]}
    # STORM_CONNECT_CONCURRENCY handshakes in flight in all, whatever the number of processes.
    local per_process=$(((STORM_CONNECT_CONCURRENCY + FLEET_PROCESSES - 1) / FLEET_PROCESSES))
    log "$k $sys: connecting $FLEET_DEVICES reconnecting devices over $FLEET_PROCESSES processes" \
        "($per_process handshakes in flight each)"
    (sim "$sys" --connect-concurrency "$per_process" --source-ips "127.0.1.1-127.0.1.2" \
        run --devices "$FLEET_DEVICES" --processes "$FLEET_PROCESSES" --rate 0 --duration 30m --json) \
        >"$dir/$k.out" 2>"$dir/$k.log" &
    fleet_pid=$!
    RUNNING[$fleet_pid]="device-sim ($k $sys)"
    log "$k $sys: kernel TCP counters before the fleet: $(tcp_counters)"
    R[${k}_first.$sys]=$(wait_online "$sys" "$FLEET_DEVICES" 600)
    [[ ${R[${k}_first.$sys]} != timeout ]] || die "storm $sys: the fleet did not come online"
    log "$k $sys: all $FLEET_DEVICES online after ${R[${k}_first.$sys]} s; restarting the server"
    sleep 2
    log "$k $sys: kernel TCP counters before the restart: $(tcp_counters)"
    handshakes=$(handshakes "$sys")
    [[ -z $handshakes ]] || log "$k $sys: the server's handshakes before its restart: $handshakes"
    # The fleet's errors so far (it prints them on SIGUSR1): the ones after are the restart's.
    kill -USR1 "$fleet_pid"
    before=$(errors_reported "$dir/$k.log")
    # CPU from the restart to all online: the fleet's, and the new server's (the socket holder's
    # own few ticks, when held, taken off).
    local fleet0 held0=0
    fleet0=$(tree_ticks "$fleet_pid")
    [[ $mode != held ]] || held0=$(cpu_ticks "${S[$sys.pid]}")
    t_term=$(now)
    if [[ $mode == held ]]; then
        restart_held "$sys"
    else
        halt "$sys"
        t_start=$(now)
        start "$sys" "$dir" full "$daddr" "$aaddr"
    fi
    R[${k}_halt.$sys]=$HALT_S
    R[${k}_listen.$sys]=$(since "$t_start")
    R[${k}_online.$sys]=$(wait_online "$sys" "$FLEET_DEVICES" "$STORM_TIMEOUT")
    R[${k}_total.$sys]=$(since "$t_term")
    R[${k}_server_cpu.$sys]=$(awk -v t=$(($(tree_ticks "${S[$sys.pid]}") - held0)) -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')
    R[${k}_fleet_cpu.$sys]=$(awk -v t=$(($(tree_ticks "$fleet_pid") - fleet0)) -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')
    [[ ${R[${k}_online.$sys]} != timeout ]] || R[${k}_total.$sys]=timeout
    R[${k}_from_start.$sys]=$(awk -v a="${R[${k}_listen.$sys]}" -v b="${R[${k}_online.$sys]}" \
        'BEGIN { if (b == "timeout") print "timeout"; else printf "%.2f", a + b }')
    handshakes=$(handshakes "$sys")
    [[ -z $handshakes ]] || log "$k $sys: the server's handshakes since its restart: $handshakes"
    log "$k $sys: kernel TCP counters with all online again: $(tcp_counters)"
    sleep 2
    stop "$fleet_pid" 30
    # Errors by kind, from the fleet's summary line on stderr.
    kinds=$(sed -nE 's/^run: stopped after .*; errors by kind: (.*)$/\1/p' "$dir/$k.log" | tail -n1)
    R[${k}_kinds.$sys]=${kinds:-none}
    # Connection refused while no server listened is expected; every other connect error is a
    # failed (or refused) handshake.
    R[${k}_refused_tcp.$sys]=$( (grep -oE 'connect: tcp=[0-9]+' <<<"$kinds" || echo =0) | cut -d= -f2)
    R[${k}_first_failures.$sys]=$(failed_handshakes "$before")
    R[${k}_failures.$sys]=$(($(failed_handshakes "$kinds") - R[${k}_first_failures.$sys]))
    log "$k $sys: halt ${R[${k}_halt.$sys]} s, listening ${R[${k}_listen.$sys]} s after start, all online" \
        "${R[${k}_online.$sys]} s after that; connect errors: ${R[${k}_kinds.$sys]}"
    # The first error of each kind in each process, as the fleet printed it.
    grep -E '^device-sim: connect: ' "$dir/$k.log" | sort | uniq -c | sed 's/^/    /' >&2 || true
}

for sys in ours node; do
    [[ $sys == ours ]] || has "$PEERS" "$sys" || continue
    has "$SCENARIOS" idle || has "$SCENARIOS" storm || break
    start "$sys" "$TMP/fleet-$sys" full
    if has "$SCENARIOS" idle; then
        idle "$sys"
    else
        (sim "$sys" provision --devices "$FLEET_DEVICES") >/dev/null 2>&1
    fi
    has "$SCENARIOS" storm && storm "$sys"
    halt "$sys"
    if has "$SCENARIOS" storm && [[ $STORM_HELD == 1 ]]; then
        start "$sys" "$TMP/fleet-$sys" full "${S[$sys.device_addr]}" "${S[$sys.api_addr]}" held
        storm "$sys" held
        halt "$sys"
    fi
done

R[fsync.after]=$(fsync_probe)

# --- the table ------------------------------------------------------------------------------
# ratio A B [DECIMALS]: A / B to 2 decimals (or DECIMALS), "-" without both.
ratio() { awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%." d "f", a / b; else print "-" }'; }
row() { printf '%-50s | %10s | %10s | %10s | %9s | %9s\n' "$@"; }
cell() { printf '%s' "${R[$1]:--}"; }
line3() { # LABEL KEY: ours, node, mosquitto and the ratios
    local o n m
    o=$(cell "$2.ours") n=$(cell "$2.node") m=$(cell "$2.mosquitto")
    row "$1" "$o" "$n" "$m" "$(ratio "$o" "$n")" "$(ratio "$o" "$m")"
}

echo
echo "== bench/run.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) CPUs ($(sed -nE '0,/^model name/s/^model name\s*:\s*//p' /proc/cpuinfo)), $(free -g | awk '/^Mem:/ { print $2 }') GiB, kernel $(uname -r); one system loaded at a time =="
echo "ours: gateway $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?'); node: $(node --version 2>/dev/null || echo '-') ws + better-sqlite3 (WAL); mosquitto: $(mosquitto -h 2>/dev/null | sed -nE '1s/.*version ([0-9.]+).*/\1/p') QoS 1 over wss, nothing stored"
echo "fsync: ${R[fsync.before]} ms before, ${R[fsync.after]} ms after (4 KiB O_DSYNC write, dd)"
row "scenario / metric" ours node mosquitto ours/node ours/mosq
if has "$SCENARIOS" ingest; then
    for sync in full normal; do
        S_=${sync^^}
        line3 "ingest $S_: acked msgs/s" "ingest_$sync.msgs"
        line3 "ingest $S_: ack p50 ms" "ingest_$sync.p50"
        line3 "ingest $S_: ack p99 ms" "ingest_$sync.p99"
        line3 "ingest $S_: server CPU µs per acked msg" "ingest_$sync.cpu_us"
        line3 "ingest $S_: server CPU, cores busy" "ingest_$sync.cpu_share"
        line3 "ingest $S_: load generator, cores busy" "ingest_$sync.sim_share"
        line3 "ingest $S_: errors" "ingest_$sync.errors"
    done
fi
if has "$SCENARIOS" commands; then
    for k in cmd_none cmd_bg; do
        label="commands, no background"
        [[ $k == cmd_bg ]] && label="commands + ${BG_TOTAL} msgs/s telemetry"
        line3 "$label: p50 ms" "$k.p50"
        line3 "$label: p99 ms" "$k.p99"
        line3 "$label: mean ms" "$k.mean"
        # The gateway's own gateway_api_request_seconds for these POSTs, read by the client
        # before and after: from the request's arrival to its response's head (node has none).
        line3 "$label: server API mean ms" "$k.api_mean"
        line3 "$label: errors" "$k.errors"
        [[ $k == cmd_bg ]] && line3 "$label: bg acked msgs/s" "$k.bg"
        # The server's created_at -> completed_at (millisecond timestamps): the part of the
        # round trip inside it, device included, HTTP and the operator's client not.
        [[ $k == cmd_bg ]] && line3 "$label: in-server p50 ms" "$k.gw_p50"
        [[ $k == cmd_bg ]] && line3 "$label: in-server p99 ms" "$k.gw_p99"
        line3 "$label: server cores" "$k.cpu_share"
        line3 "$label: machine cores" "$k.machine"
    done
fi
if has "$SCENARIOS" idle; then
    line3 "idle $FLEET_DEVICES: server KiB per connection" rss_per_conn
    line3 "idle $FLEET_DEVICES: seconds to connect all" connect_s
    line3 "idle $FLEET_DEVICES: connected" connected
    line3 "provision $FLEET_DEVICES via API: seconds" provision
fi
if has "$SCENARIOS" storm; then
    line3 "storm: s from SIGTERM to exit" storm_halt
    line3 "storm: s from start to all online" storm_from_start
    line3 "storm: s from SIGTERM to all online" storm_total
    line3 "storm: server CPU s, start to all online" storm_server_cpu
    line3 "storm: device-sim CPU s, SIGTERM to online" storm_fleet_cpu
    line3 "storm: failed handshakes, first connect" storm_first_failures
    line3 "storm: failed handshakes after restart" storm_failures
    line3 "storm: refused TCP connects (no server)" storm_refused_tcp
    if [[ $STORM_HELD == 1 ]]; then
        line3 "storm, socket held: s from SIGTERM to exit" held_halt
        line3 "storm, socket held: s from start to all online" held_from_start
        line3 "storm, socket held: s from SIGTERM to all online" held_total
        line3 "storm, socket held: server CPU s to online" held_server_cpu
        line3 "storm, socket held: device-sim CPU s" held_fleet_cpu
        line3 "storm, socket held: failed handshakes after" held_failures
        line3 "storm, socket held: refused TCP connects" held_refused_tcp
    fi
fi
echo "ratio: ours / peer (for msgs/s higher is better; for ms, µs, KiB and seconds lower is better)"
echo "commands: $CMD_COMMANDS ping commands with wait_s=$CMD_WAIT_S, round-robin over $CMD_DEVICES devices, $CMD_CONCURRENCY operator(s); background: $BG_DEVICES devices x $BG_RATE msgs/s"
if has "$SCENARIOS" storm; then
    for sys in ours node; do
        [[ -n ${R[storm_kinds.$sys]:-} ]] && echo "storm $sys: client-side errors by kind: ${R[storm_kinds.$sys]}"
        [[ -n ${R[held_kinds.$sys]:-} ]] && echo "storm, socket held, $sys: client-side errors by kind: ${R[held_kinds.$sys]}"
    done
fi

# --- the targets of issue 7 -----------------------------------------------------------------
# target TEXT VALUE TEST: TEST is an awk condition on v. A ratio is judged to 4 decimals, not
# the table's 2, so that 0.9975 is not rounded up to a target of 1.
target() {
    local verdict
    verdict=$(awk -v v="$2" "BEGIN { if (v == \"-\" || v == \"\" || v == \"timeout\") print \"n/a\"; else if ($3) print \"holds\"; else print \"DOES NOT HOLD\" }")
    printf '%-62s %10s  %s\n' "$1" "$2" "$verdict"
}
echo
echo "-- targets (issue 7)"
if has "$SCENARIOS" ingest; then
    target "ingest FULL: ours/node msgs/s >= 2" "$(ratio "$(cell ingest_full.msgs.ours)" "$(cell ingest_full.msgs.node)" 4)" "v >= 2"
    target "ingest NORMAL: ours/node msgs/s >= 2" "$(ratio "$(cell ingest_normal.msgs.ours)" "$(cell ingest_normal.msgs.node)" 4)" "v >= 2"
    target "ingest FULL: ours/mosquitto msgs/s >= 1" "$(ratio "$(cell ingest_full.msgs.ours)" "$(cell ingest_full.msgs.mosquitto)" 4)" "v >= 1"
fi
if has "$SCENARIOS" idle; then
    target "idle: KiB per connection <= 16" "$(cell rss_per_conn.ours)" "v <= 16"
    target "idle: ours/node KiB per connection <= 0.25" "$(ratio "$(cell rss_per_conn.ours)" "$(cell rss_per_conn.node)" 4)" "v <= 0.25"
    target "idle: ours/node time to connect <= 1/3" "$(ratio "$(cell connect_s.ours)" "$(cell connect_s.node)" 4)" "v <= 1/3"
fi
if has "$SCENARIOS" commands; then
    target "commands, no background: p99 ms <= 3" "$(cell cmd_none.p99.ours)" "v <= 3"
    target "commands, no background: ours/node p99 <= 0.3" "$(ratio "$(cell cmd_none.p99.ours)" "$(cell cmd_none.p99.node)" 4)" "v <= 0.3"
    target "commands + telemetry: p99 ms <= 3" "$(cell cmd_bg.p99.ours)" "v <= 3"
    target "commands + telemetry: ours/node p99 <= 0.3" "$(ratio "$(cell cmd_bg.p99.ours)" "$(cell cmd_bg.p99.node)" 4)" "v <= 0.3"
fi
if has "$SCENARIOS" storm; then
    target "storm: all $FLEET_DEVICES online within 10 s of the restart" "$(cell storm_from_start.ours)" "v <= 10"
    target "storm: no failed handshake after the restart" "$(cell storm_failures.ours)" "v == 0"
    if [[ $STORM_HELD == 1 ]]; then
        target "storm, socket held: all $FLEET_DEVICES online within 10 s" "$(cell held_from_start.ours)" "v <= 10"
        target "storm, socket held: none refused (handshakes + TCP)" \
            "$(($(cell held_failures.ours) + ${R[held_refused_tcp.ours]:-0}))" "v == 0"
    fi
fi
