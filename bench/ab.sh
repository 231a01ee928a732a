#!/usr/bin/env bash
# ab.sh — interleaved rounds of several weft builds (and the reference), side by side.
#
# usage: bench/ab.sh [-r ROUNDS] [-n N] [-c C] [--json FILE] [--ratio A/B]... VARIANT...
#
#   VARIANT  LABEL=ref                bridge + host-local (bench/confs/bridge-only.conflist.json)
#            LABEL=DIR                weft from DIR (holding `weft` and `weft-operator`)
#            LABEL=DIR:LIMITS         the same with the Network's `spec.limits` (WEFT_BENCH_LIMITS),
#                                     e.g. 'lim=target/release:{egressBandwidth: 100M}'
#   -r       rounds (default 10); every round runs each variant once (`-n` pods, sequentially
#            then `-c`-way), the order rotated by one variant from round to round, so that no
#            variant always follows the same one (a run's namespaces are torn down by the kernel
#            after it ends, partly while the next one starts)
#   --json   keep the per-run JSON lines there (default: a temporary file, removed)
#   --ratio  A/B: also report, round by round, A's figures over B's (sequential ADD p50, 8-way
#            pods/s), with their median, the median's 95 % interval (from six rounds on) and
#            their mean; given several times, several pairs
#
# One machine's rounds scatter (one build's sequential ADD p50 over 1.4–2.2 ms within a batch
# on the two-CPU machines of docs/benchmarks.md): compare builds by the ratios of the same
# rounds, over tens of rounds, not by single runs.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROUNDS=10; N=100; C=8; JSON=""; RATIOS=(); VARIANTS=()
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    -r) ROUNDS=$2; shift 2;;
    -n) N=$2; shift 2;;
    -c) C=$2; shift 2;;
    --json) JSON=$2; shift 2;;
    --ratio) RATIOS+=("$2"); shift 2;;
    -h|--help) usage;;
    -*) echo "unknown option: $1" >&2; usage;;
    *=*) VARIANTS+=("$1"); shift;;
    *) echo "a variant is LABEL=ref, LABEL=DIR or LABEL=DIR:LIMITS, not $1" >&2; usage;;
  esac
done
[ ${#VARIANTS[@]} -gt 0 ] || usage
for v in "${VARIANTS[@]}"; do
  rest=${v#*=}; dir=${rest%%:*}
  if [ "$rest" != ref ] && { [ ! -x "$dir/weft" ] || [ ! -x "$dir/weft-operator" ]; }; then
    echo "variant ${v%%=*}: $dir must hold the weft and weft-operator binaries" >&2; exit 2
  fi
done
KEEP=1
if [ -z "$JSON" ]; then JSON="$(mktemp /tmp/weft-ab.XXXXXX)"; KEEP=""; trap 'rm -f "$JSON" "$JSON.run"' EXIT; fi

count=${#VARIANTS[@]}
for r in $(seq 0 $((ROUNDS - 1))); do
  for k in $(seq 0 $((count - 1))); do
    v=${VARIANTS[$(((k + r) % count))]}
    label=${v%%=*}; rest=${v#*=}
    rm -f "$JSON.run"
    if [ "$rest" = ref ]; then
      "$HERE/cni-bench.sh" -n "$N" -c "$C" --runs 1 --label "$label" --json "$JSON.run" \
        "$HERE/confs/bridge-only.conflist.json" >/dev/null 2>&1 || echo "round $((r + 1)): $label failed" >&2
    else
      dir=${rest%%:*}; limits=""
      [ "$rest" != "$dir" ] && limits=${rest#*:}
      WEFT_BIN_DIR=$dir WEFT_BENCH_LIMITS="$limits" "$HERE/cni-bench-weft.sh" -n "$N" -c "$C" --runs 1 \
        --label "$label" --json "$JSON.run" >/dev/null 2>&1 || echo "round $((r + 1)): $label failed" >&2
    fi
    # Each run's lines with their round, by which the report pairs variants.
    [ -f "$JSON.run" ] && sed "s/^{/{\"round\": $r, /" "$JSON.run" >> "$JSON"
    rm -f "$JSON.run"
  done
  echo "round $((r + 1)) of $ROUNDS done" >&2
done
python3 "$HERE/lib/ab_report.py" "$JSON" "${RATIOS[@]}"
[ -n "$KEEP" ] && echo "runs kept in $JSON" >&2
exit 0
