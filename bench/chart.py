#!/usr/bin/env python3
"""Draws the table printed by bench/run.sh as an SVG bar chart (standard library only).

    bash bench/run.sh | tee run.txt
    python3 bench/chart.py run.txt docs/benchmarks.svg

One group of bars per headline metric, one bar per system, each scaled to the largest value of
its group and labelled with the figure itself; the note under each group says which way is
better.
"""
import html
import sys

# (row label prefix in the table, title in the chart, which way is better)
METRICS = [
    ("ingest FULL: acked msgs/s", "ingest, synchronous=FULL: acked msgs/s", "higher is better"),
    ("ingest NORMAL: acked msgs/s", "ingest, synchronous=NORMAL: acked msgs/s", "higher is better"),
    ("ingest FULL: server CPU µs per acked msg", "ingest FULL: server CPU µs per acked message", "lower is better"),
    ("ingest FULL: ack p99 ms", "ingest FULL: ack latency p99, ms", "lower is better"),
    ("commands, no background: p99 ms", "command round trip p99, ms", "lower is better"),
    ("commands + ", "command round trip p99 with telemetry, ms", "lower is better"),
    ("idle ", "idle fleet: server KiB per connection", "lower is better"),
    ("idle-connect", "idle fleet: seconds to connect all", "lower is better"),
    ("storm: s from start to all online", "reconnect storm: s from start to all online", "lower is better"),
    ("storm, socket held: s from start to all online", "reconnect storm, socket held: s from start to all online", "lower is better"),
]
SYSTEMS = [("ours", "#2b6cb0"), ("node", "#c05621"), ("mosquitto", "#2f855a")]


def parse(path):
    """The table rows: label -> {system: float}."""
    rows = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.rstrip("\n").split("|")]
            if len(cells) != 6 or cells[0] == "scenario / metric":
                continue
            values = {}
            for (system, _), cell in zip(SYSTEMS, cells[1:4]):
                try:
                    values[system] = float(cell)
                except ValueError:
                    pass
            rows[cells[0]] = values
    return rows


def find(rows, prefix, title):
    """The row for one metric (the idle rows share a prefix and are told apart here)."""
    for label, values in rows.items():
        if prefix == "idle " and not (label.startswith("idle ") and "KiB per connection" in label):
            continue
        if prefix == "idle-connect":
            if label.startswith("idle ") and "seconds to connect" in label:
                return label, values
            continue
        if prefix == "commands + " and not (label.startswith("commands + ") and label.endswith(": p99 ms")):
            continue
        if label.startswith(prefix):
            return label, values
    return None, {}


def svg(rows):
    width, left, bar_h, gap = 860, 330, 16, 26
    groups = [(title, better, find(rows, prefix, title)[1]) for prefix, title, better in METRICS]
    groups = [g for g in groups if g[2]]
    out = [
        '<text x="10" y="22" font-size="15" font-weight="bold">bench/run.sh: ours against the peers '
        "(one run, same machine)</text>",
    ]
    x = 10
    for system, colour in SYSTEMS:
        out.append(f'<rect x="{x}" y="34" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{x + 16}" y="44">{system}</text>')
        x += 110
    y = 70
    for title, better, values in groups:
        out.append(f'<text x="10" y="{y + 10}" font-weight="bold">{html.escape(title)}</text>')
        out.append(f'<text x="10" y="{y + 24}" fill="#555">{better}</text>')
        top = max(values.values()) or 1.0
        for system, colour in SYSTEMS:
            if system not in values:
                continue
            value = values[system]
            length = max(1.0, (width - left - 90) * value / top)
            out.append(f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar_h - 3}" fill="{colour}"/>')
            out.append(f'<text x="{left + length + 5:.1f}" y="{y + bar_h - 5}">{value:g}</text>')
            y += bar_h
        y += max(gap + 14 - len(values) * bar_h, 8) + 14
    height = y + 10
    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    return "\n".join(head + out + ["</svg>"]) + "\n"


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: chart.py RUN_OUTPUT.txt OUT.svg")
    rows = parse(sys.argv[1])
    if not rows:
        sys.exit(f"no table rows in {sys.argv[1]}")
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        f.write(svg(rows))


if __name__ == "__main__":
    main()
