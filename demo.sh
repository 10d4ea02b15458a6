#!/bin/sh
# The README's first command: build the gateway and the device simulator, then start the
# gateway on its defaults in this directory with a fleet of 100 simulated devices and print
# where to look. Ctrl-C stops the fleet, then the gateway.
# Arguments go to `device-sim demo`, e.g. `./demo.sh --devices 500 --rate 2`.
set -e
cd "$(dirname "$0")"
cargo build --release -p gateway -p device-sim
exec "${CARGO_TARGET_DIR:-target}/release/device-sim" demo "$@"
