"""Compares an Autobahn fuzzingclient report with tests/autobahn/expected.json.

Usage: compare.py REPORT_INDEX_JSON EXPECTED_JSON [--update]

Prints a summary (cases per behavior) and exits 1 on a regression: a case of
expected.json missing from the report, a case whose behavior or close behavior
is worse than expected, or a case the report has and expected.json does not.
A case that got better is reported and does not fail; --update rewrites
expected.json from the report. Runs on Python 2.7 (the wstest virtualenv) and 3.
"""
from __future__ import print_function

import json
import sys

AGENT = "gateway"
# Worse is higher. INFORMATIONAL and UNIMPLEMENTED are neither pass nor fail.
RANK = {
    "OK": 0,
    "NON-STRICT": 1,
    "INFORMATIONAL": 1,
    "UNIMPLEMENTED": 1,
    "WRONG CODE": 2,
    "UNCLEAN": 2,
    "FAILED": 3,
}
FIELDS = ("behavior", "behaviorClose")


def case_key(case_id):
    return tuple(int(part) for part in case_id.split("."))


def rank(behavior):
    return RANK.get(behavior, max(RANK.values()))


def load(path):
    with open(path) as f:
        return json.load(f)


def outcomes(index):
    agents = list(index)
    if agents != [AGENT]:
        sys.exit("compare.py: expected one agent %r in the report, found %r" % (AGENT, agents))
    return dict(
        (case, dict((field, result[field]) for field in FIELDS))
        for case, result in index[AGENT].items()
    )


def write_expected(path, actual):
    lines = ['{', '  "agent": "%s",' % AGENT, '  "cases": {']
    cases = sorted(actual, key=case_key)
    for i, case in enumerate(cases):
        comma = "," if i + 1 < len(cases) else ""
        body = ", ".join('"%s": "%s"' % (field, actual[case][field]) for field in FIELDS)
        lines.append('    "%s": {%s}%s' % (case, body, comma))
    lines += ["  }", "}", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def summary(actual):
    counts = {}
    for result in actual.values():
        counts[result["behavior"]] = counts.get(result["behavior"], 0) + 1
    always = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
    shown = always + sorted(b for b in counts if b not in always)
    return "  ".join("%s: %d" % (b, counts.get(b, 0)) for b in shown)


def main(argv):
    if len(argv) not in (3, 4) or (len(argv) == 4 and argv[3] != "--update"):
        sys.exit(__doc__)
    actual = outcomes(load(argv[1]))
    print("autobahn: %d cases  %s" % (len(actual), summary(actual)))
    if len(argv) == 4:
        write_expected(argv[2], actual)
        print("autobahn: wrote %s" % argv[2])
        return 0
    expected = load(argv[2])["cases"]
    problems, better = [], []
    for case in sorted(expected, key=case_key):
        if case not in actual:
            problems.append("%s: missing from the report" % case)
            continue
        for field in FIELDS:
            want, got = expected[case][field], actual[case][field]
            if rank(got) > rank(want):
                problems.append("%s: %s %s, expected %s" % (case, field, got, want))
            elif got != want:
                better.append("%s: %s %s, expected %s" % (case, field, got, want))
    for case in sorted(set(actual) - set(expected), key=case_key):
        problems.append("%s: not in expected.json (%s)" % (case, actual[case]["behavior"]))
    for line in better:
        print("autobahn: changed, not worse: " + line)
    if better:
        print("autobahn: record these with tests/autobahn/run.sh --update")
    for line in problems:
        print("autobahn: REGRESSION " + line)
    if problems:
        print("autobahn: %d regression(s) against expected.json" % len(problems))
        return 1
    print("autobahn: no regression against expected.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
