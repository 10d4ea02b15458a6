#!/usr/bin/env bash
# RFC 6455 conformance: runs the Autobahn suite (wstest fuzzingclient) against the
# gateway's device endpoint in conformance echo mode and compares the per-case
# results with tests/autobahn/expected.json. See tests/autobahn/README.md.
#
#   tests/autobahn/run.sh            run, fail on a regression
#   tests/autobahn/run.sh --update   run, then rewrite expected.json from the results
#
# Needs Python 2.7 (wstest runs on nothing newer): AUTOBAHN_PYTHON, else pyenv's
# 2.7.18, else any python2.7 on PATH. Without one it says so and exits 0, unless
# AUTOBAHN_REQUIRED=1. The virtualenv is made once, in AUTOBAHN_VENV
# (default ~/.cache/gateway-autobahn/venv), from requirements.txt.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

update=""
case "${1:-}" in
"") ;;
--update) update="--update" ;;
*)
    echo "usage: $0 [--update]" >&2
    exit 2
    ;;
esac

is_python27() {
    [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' 2>/dev/null
}

python=""
for candidate in "${AUTOBAHN_PYTHON:-}" "$HOME/.pyenv/versions/2.7.18/bin/python" \
    "$HOME"/.pyenv/versions/2.7*/bin/python "$(command -v python2.7 || true)"; do
    if is_python27 "$candidate"; then
        python="$candidate"
        break
    fi
done
if [ -z "$python" ]; then
    echo "autobahn: SKIPPED: no Python 2.7 found (set AUTOBAHN_PYTHON, or install 2.7.18 with pyenv)"
    [ "${AUTOBAHN_REQUIRED:-0}" = 1 ] && exit 1
    exit 0
fi

# The virtualenv, made once per requirements.txt (its hash is kept beside it).
venv="${AUTOBAHN_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/gateway-autobahn/venv}"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1) $python"
if [ "$(cat "$venv/.requirements" 2>/dev/null || true)" != "$want" ]; then
    echo "autobahn: installing wstest into $venv (Python: $python)"
    rm -rf "$venv"
    tools="$(mktemp -d)"
    log="$tools/install.log"
    # A virtualenv release that still runs on Python 2, into a throwaway directory.
    if ! { "$python" -m pip install --disable-pip-version-check --target "$tools/lib" \
        virtualenv==20.15.1 &&
        PYTHONPATH="$tools/lib" "$python" -m virtualenv "$venv" &&
        "$venv/bin/pip" install --disable-pip-version-check --no-deps \
            -r "$here/requirements.txt" &&
        "$venv/bin/wstest" --autobahnversion; } >"$log" 2>&1; then
        echo "autobahn: installing wstest failed:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
    rm -rf "$tools"
    echo "$want" >"$venv/.requirements"
fi

target_dir="$(cargo metadata --format-version 1 --no-deps |
    "$venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
work="$(mktemp -d)"
gateway_pid=""
cleanup() {
    if [ -n "$gateway_pid" ]; then
        kill "$gateway_pid" 2>/dev/null || true
        wait "$gateway_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# Build the echo mode (cargo feature `conformance`) and copy the binary at once:
# target/debug/gateway is the default build's path too. Built as the tests build the binaries
# (`--workspace --bins`, tests/src/gateway.rs), the dependencies have the workspace's features
# and the test build's are reused; `-p gateway` alone would compile about 70 crates again.
for attempt in 1 2 3; do
    cargo build --quiet --workspace --bins --features gateway/conformance
    cp "$target_dir/debug/gateway" "$work/gateway"
    case "$("$work/gateway" --help)" in
    *--conformance-echo*) break ;;
    esac
    [ "$attempt" = 3 ] && {
        echo "autobahn: $target_dir/debug/gateway keeps being replaced by a default build" >&2
        exit 1
    }
done

# Plain ws:// on port 0, a throwaway database. max_message_bytes stays at its
# default (64 KiB): the suite checks the configuration devices get.
"$work/gateway" --no-tls --conformance-echo \
    --device-addr 127.0.0.1:0 --api-addr 127.0.0.1:0 \
    --database-url "sqlite://$work/gateway.db" --api-key "autobahn-$RANDOM$RANDOM" \
    --synchronous normal >"$work/gateway.out" 2>"$work/gateway.log" &
gateway_pid=$!
url=""
for _ in $(seq 300); do
    url="$(sed -n 's/^listening device=\(ws:[^ ]*\) .*/\1/p' "$work/gateway.out")"
    [ -n "$url" ] && break
    if ! kill -0 "$gateway_pid" 2>/dev/null; then
        echo "autobahn: the gateway exited:" >&2
        cat "$work/gateway.log" >&2
        exit 1
    fi
    sleep 0.1
done
if [ -z "$url" ]; then
    echo "autobahn: the gateway printed no listening line in 30 s" >&2
    exit 1
fi

reports="$target_dir/autobahn/reports"
rm -rf "$reports"
mkdir -p "$reports"
"$venv/bin/python" - "$here/fuzzingclient.json" "$work/spec.json" "$url" "$reports" <<'EOF'
import json, sys
template, out, url, reports = sys.argv[1:]
spec = json.load(open(template))
spec["servers"][0]["url"] = url
spec["outdir"] = reports
json.dump(spec, open(out, "w"), indent=2)
EOF

echo "autobahn: wstest fuzzingclient against $url"
start=$(date +%s)
if ! (cd "$work" && timeout 600 "$venv/bin/wstest" -m fuzzingclient -s spec.json >wstest.log 2>&1); then
    echo "autobahn: wstest failed:" >&2
    tail -n 30 "$work/wstest.log" >&2
    exit 1
fi
echo "autobahn: $(grep -c '^Running test case' "$work/wstest.log") cases ran in $(($(date +%s) - start)) s; report: $reports/index.html"
if grep -q ' ERROR ' "$work/gateway.log"; then
    echo "autobahn: the gateway logged errors:" >&2
    grep ' ERROR ' "$work/gateway.log" | head -n 20 >&2
    exit 1
fi
"$venv/bin/python" "$here/compare.py" "$reports/index.json" "$here/expected.json" $update
