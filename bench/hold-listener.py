#!/usr/bin/env python3
"""Holds a server's listening socket across its restarts, as systemd socket activation does.

usage: hold-listener.py HOST:PORT -- COMMAND [ARG...]

Binds HOST:PORT (backlog 4096) and runs COMMAND with the socket as descriptor 3 and
LISTEN_FDS=1, LISTEN_FDNAMES=device in its environment (systemd's protocol; LISTEN_PID is
left out, as systemfd does, since the child's pid is not known before it starts).

SIGHUP restarts the command: SIGTERM, wait for it to exit, start it again. The socket stays
open meanwhile, so a client connecting then waits in the kernel's accept queue instead of
being refused, and the new process accepts it. SIGTERM or SIGINT stops the command, then the
holder. If the command exits by itself, so does the holder, with its status. Each step is
logged on stderr as `hold: ...` (the restart as `hold: pid N stopped in S s`).
"""

import os
import signal
import socket
import subprocess
import sys
import time

SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


def log(message):
    print(f"hold: {message}", file=sys.stderr, flush=True)


def exit_code(status):
    """A shell's exit status for a child's: 128 + N when signal N ended it."""
    return status if status >= 0 else 128 - status


def bind(addr):
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(4096)
    return sock


def main():
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit(__doc__.strip().splitlines()[2])
    sock = bind(sys.argv[1])
    if sock.fileno() != 3:
        os.dup2(sock.fileno(), 3)
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="device")
    env.pop("LISTEN_PID", None)
    command = sys.argv[3:]

    def spawn():
        # The child must not inherit the blocked signals (it would never see its SIGTERM).
        child = subprocess.Popen(
            command,
            pass_fds=(3,),
            env=env,
            preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS),
        )
        log(f"started pid {child.pid} with the socket on {sys.argv[1]}")
        return child

    def stop(child):
        t = time.monotonic()
        child.terminate()
        status = child.wait()
        log(f"pid {child.pid} stopped in {time.monotonic() - t:.2f} s (status {status})")
        return status

    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    child = spawn()
    while True:
        info = signal.sigtimedwait(SIGNALS, 0.05)
        if info is None:
            status = child.poll()
            if status is not None:
                log(f"pid {child.pid} exited by itself (status {status})")
                return exit_code(status)
            continue
        if info.si_signo == signal.SIGHUP:
            stop(child)
            child = spawn()
        else:
            return exit_code(stop(child))


if __name__ == "__main__":
    sys.exit(main())
