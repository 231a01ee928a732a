"""Report of bench/ab.sh: per variant, and per pair of variants round by round.

usage: ab_report.py RUNS.jsonl [A/B ...]

RUNS.jsonl holds cni_bench.py's per-run JSON lines (`--json`), each with its `label`; a run of
concurrency 1 is a variant's sequential pass, any other its concurrent one. Rounds are matched
by their `round` (bench/ab.sh adds it): A's sequential run of a round with B's of the same
round; a round where either failed is left out of that pair.
"""
import collections
import json
import statistics
import sys


def runs(path):
    by = collections.defaultdict(lambda: {"seq": [], "conc": []})
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                by[r["label"]]["seq" if r["c"] == 1 else "conc"].append(r)
    return by


def spread(values, fmt, unit):
    if not values:
        return "no runs"
    return (f"median {fmt % statistics.median(values)} {unit} "
            f"({fmt % min(values)}–{fmt % max(values)}, {len(values)} runs)")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    by = runs(sys.argv[1])
    for label, m in by.items():
        print(f"{label}: sequential ADD p50 "
              f"{spread([r['add_p50'] for r in m['seq']], '%.2f', 'ms')}; 8-way "
              f"{spread([r['add_pods_s'] for r in m['conc']], '%.0f', 'pods/s')}; DEL p50 "
              f"{spread([r['del_p50'] for r in m['seq']], '%.2f', 'ms')}")
    for pair in sys.argv[2:]:
        a, _, b = pair.partition("/")
        if a not in by or b not in by:
            print(f"{pair}: no runs of {a if a not in by else b}")
            continue
        def paired(mode, field):
            theirs = {r.get("round"): r for r in by[b][mode]}
            return [r[field] / theirs[r.get("round")][field]
                    for r in by[a][mode] if r.get("round") in theirs]

        seq = paired("seq", "add_p50")
        conc = paired("conc", "add_pods_s")
        for name, v in (("sequential ADD p50", seq), ("8-way pods/s", conc)):
            if v:
                print(f"{a} / {b}, {name}: median {statistics.median(v):.3f}, mean "
                      f"{statistics.mean(v):.3f}, per round "
                      + " ".join("%.3f" % x for x in v))


if __name__ == "__main__":
    main()
