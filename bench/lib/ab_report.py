"""Report of bench/ab.sh: per variant, and per pair of variants round by round.

usage: ab_report.py RUNS.jsonl [A/B ...]

RUNS.jsonl holds cni_bench.py's per-run JSON lines (`--json`), each with its `label`; a run of
concurrency 1 is a variant's sequential pass, any other its concurrent one. Rounds are matched
by their `round` (bench/ab.sh adds it): A's sequential run of a round with B's of the same
round; a round where either failed is left out of that pair.
"""
import collections
import json
import math
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


def median_interval(values, level=0.95):
    """The median's confidence interval at `level`, free of any assumption on the
    distribution: the k-th smallest and the k-th largest value, for the largest k that leaves
    at least `level` between them (the median lies below the k-th smallest value only when at
    most k - 1 values fall under it: a binomial tail of n draws at one half). None with too few
    values (fewer than 6 at 95 %).

    >>> median_interval([5, 1, 4, 2, 3])
    >>> median_interval([6, 1, 5, 2, 4, 3])
    (1, 6)
    >>> median_interval(list(range(1, 31)))
    (10, 21)
    >>> median_interval(list(range(1, 17)))
    (4, 13)
    >>> median_interval(list(range(1, 31)), 0.99)
    (8, 23)
    """
    n = len(values)
    xs = sorted(values)
    below = 0.0  # P(B <= k - 1), B ~ Binomial(n, 1/2)
    best = None
    for k in range(1, n // 2 + 1):
        below += math.comb(n, k - 1) / 2 ** n
        if 1 - 2 * below < level:
            break
        best = k
    return None if best is None else (xs[best - 1], xs[n - best])


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
                ci = median_interval(v)
                ci = "" if ci is None else " (95 %% interval %.3f–%.3f)" % ci
                print(f"{a} / {b}, {name}: median {statistics.median(v):.3f}{ci}, mean "
                      f"{statistics.mean(v):.3f}, per round "
                      + " ".join("%.3f" % x for x in v))


if __name__ == "__main__":
    main()
