#!/usr/bin/env python3
"""Waits until a server reports COUNT devices online, polling its /metrics every 50 ms.

usage: wait-online.py ROOT_URL COUNT TIMEOUT_S SINCE

ROOT_URL is http://HOST:PORT (the gauge is `gateway_connections` at ROOT_URL/metrics); SINCE is
a Unix time in seconds (`date +%s.%N`). Prints the seconds from SINCE until the gauge reached
COUNT, or `timeout` after TIMEOUT_S seconds (with the last count on stderr). A server that does
not answer (not listening yet, restarting) counts as none online.

One process and one kept-alive connection for the whole wait. bench/run.sh polled with curl and
awk in a shell loop before, and those processes took about 20 ms of CPU per poll: a quarter of a
core on the two cores that the server and its fleet share while the time is measured.
"""

import http.client
import re
import sys
import time
from urllib.parse import urlsplit

POLL_S = 0.05
GAUGE = re.compile(rb"^gateway_connections (\d+)", re.MULTILINE)


class Poller:
    def __init__(self, root):
        url = urlsplit(root)
        self.host, self.port = url.hostname, url.port or 80
        self.conn = None

    def online(self):
        """The gauge, or -1 if the server did not answer or has no such gauge."""
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
            self.conn.request("GET", "/metrics")
            response = self.conn.getresponse()
            body = response.read()
            if response.will_close:
                self.close()
            if response.status != 200:
                return -1
        except (OSError, http.client.HTTPException):
            self.close()
            return -1
        found = GAUGE.search(body)
        return int(found.group(1)) if found else -1

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__.strip().splitlines()[2])
    root, count, timeout_s, since = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    poller = Poller(root)
    deadline = time.monotonic() + timeout_s
    while True:
        n = poller.online()
        if n >= count:
            print(f"{time.time() - since:.2f}")
            return
        if time.monotonic() >= deadline:
            print(f"wait-online: {n} of {count} online at {root} after {timeout_s:g} s", file=sys.stderr)
            print("timeout")
            return
        time.sleep(POLL_S)


if __name__ == "__main__":
    main()
