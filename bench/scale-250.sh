#!/usr/bin/env bash
# scale-250.sh — 250 workloads on one node: start them all, check a sample of the connectivity
# matrix, and report the start time, the CNI ADD time, the agent's memory and CPU, and what weft
# made on the node (nftables and tc objects, links).
#
# usage: bench/scale-250.sh [--idle SECONDS] [FILE]
#   FILE (default examples/scale/node-250.yaml: one node `node-a`, one workload a line) runs with
#   `weft-lab --keep`;
#   the agent gets a metrics port in the node's namespace (WEFT_METRICS_ADDR through weft-lab's
#   environment), which the script reads every 0.5 s while the lab starts: the wall time from
#   the lab's start to the agent's first and last endpoint, and the ADD durations the weft binary
#   reported (`weft_agent_cni_duration_seconds`: mean, and p50/p95 interpolated in the
#   histogram's buckets, which double from 0.5 ms). The lab's run must pass (every workload
#   started, every expectation held), else the script fails after printing where the lab
#   stopped and how many endpoints the agent had. The lab's matrix (every workload and the
#   outside host against each listening workload, all sources at once) is summed up (a "no" is
#   explained by a policy rule the lab names or by two NAT Networks); then a sample
#   (every tenth pod against each listening target that is not a VM) is probed again one
#   probe at a time with the script's own listeners, and must agree with `weft-lab trace` and
#   the NAT isolation. Then: the agent's RSS (VmRSS) and CPU time (utime + stime) right after
#   the lab and after --idle SECONDS (default 60, in 10 s slices);
#   in the node's namespace: nftables tables, chains, rules, sets, set elements; tc qdiscs and
#   filters (every link, ingress and egress); links by kind. The lab is removed on exit, also
#   on failure or Ctrl-C.
# Runs the real agent and CNI (debug build from `cargo build --workspace`, or WEFT_BIN_DIR);
# root, python3, nft, tc.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 2; }
for c in python3 nft tc ip; do
  command -v "$c" >/dev/null || { echo "missing $c" >&2; exit 2; }
done
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${WEFT_BIN_DIR:-$ROOT/target/debug}"
IDLE=60
FILE="$ROOT/examples/scale/node-250.yaml"
usage() { sed -n 's/^# usage: /usage: /p' "${BASH_SOURCE[0]}" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --idle) IDLE="$2"; shift 2;;
    -h|--help) usage;;
    -*) echo "unknown argument: $1" >&2; usage;;
    *) FILE="$1"; shift;;
  esac
done
[ -x "$BIN/weft-lab" ] || { echo "missing $BIN/weft-lab (cargo build --workspace)" >&2; exit 2; }
[ -f "$FILE" ] || { echo "no lab file $FILE" >&2; exit 2; }
LAB=n250
NODENS="wl-$LAB-n-node-a"
PORT=29250
TMP="$(mktemp -d /tmp/weft-scale.XXXXXX)"
POLLER=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$POLLER" ] && kill "$POLLER" 2>/dev/null || true
  if [ -f "$TMP/serve.pids" ]; then
    for p in $(cat "$TMP/serve.pids"); do kill "$p" 2>/dev/null || true; done
  fi
  "$BIN/weft-lab" down "$FILE" --name "$LAB" >/dev/null 2>&1 || true
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
die() { echo "scale-250: $*" >&2; exit 1; }
# The lab file's workloads, one a line: name kind first-network (the file keeps one per line).
python3 - "$FILE" > "$TMP/workloads" <<'PY'
import re, sys
inside = False
for l in open(sys.argv[1]):
    if re.match(r"^\w", l):
        inside = l.startswith("workloads:")
        continue
    m = re.match(r"\s*- \{name: ([\w-]+),.*", l)
    if inside and m:
        kind = re.search(r"kind: (\w+)", l)
        net = re.search(r"networks: \[([\w-]+)", l)
        print(m.group(1), kind.group(1) if kind else "Pod", net.group(1) if net else "-")
PY
WANT=$(wc -l < "$TMP/workloads")
[ "$WANT" -gt 0 ] || die "no workloads found in $FILE"
metrics() { ip netns exec "$NODENS" python3 -c '
import sys, urllib.request
try:
    print(urllib.request.urlopen("http://127.0.0.1:'"$PORT"'/metrics", timeout=2).read().decode())
except Exception:
    pass' 2>/dev/null || true; }

# While the lab starts: the agent's endpoint count every 0.5 s, with the time since the start.
START=$(date +%s.%N)
(
  set +e +o pipefail
  while sleep 0.5; do
    n=$(metrics | sed -n 's/^weft_agent_endpoints \([0-9]*\).*/\1/p')
    [ -n "$n" ] && echo "$(python3 -c "import time; print('%.2f' % (time.time() - $START))") $n" >> "$TMP/endpoints"
  done
) &
POLLER=$!
set +e
WEFT_METRICS_ADDR="127.0.0.1:$PORT" "$BIN/weft-lab" "$FILE" --keep --name "$LAB" > "$TMP/lab.out" 2>&1
RC=$?
set -e
END=$(date +%s.%N)
kill "$POLLER" 2>/dev/null || true; wait "$POLLER" 2>/dev/null || true; POLLER=""
WALL=$(python3 -c "print('%.1f' % ($END - $START))")
HAVE=$(tail -n1 "$TMP/endpoints" 2>/dev/null | cut -d' ' -f2 || true)
if [ "$RC" != 0 ]; then
  echo "# weft-lab exited $RC after $WALL s; the agent had ${HAVE:-?} of $WANT endpoints; the end of its output:" >&2
  tail -25 "$TMP/lab.out" >&2
  AG=/run/weft-lab/$LAB/node-a/agent.log
  [ -f "$AG" ] && { echo "# the end of the agent's log:" >&2; tail -5 "$AG" | cut -c1-300 >&2; }
  die "the lab did not run through"
fi
AGENT=$(pgrep -f -- "--state-dir /run/weft-lab/$LAB/node-a/state" | head -n1 || true)
[ -n "$AGENT" ] || die "no agent process for the lab"
metrics > "$TMP/metrics.txt"
grep -q "^weft_agent_endpoints $WANT\b" "$TMP/metrics.txt" ||
  die "the agent's metrics (127.0.0.1:$PORT in $NODENS) do not show $WANT endpoints: $(grep '^weft_agent_endpoints' "$TMP/metrics.txt" || echo 'no metrics')"

# The expectations and the matrix, as the lab printed them. A "no" is explained when the lab
# names the policy rule that denies the pair, or when the two are on different NAT Networks.
python3 - "$TMP/lab.out" "$TMP/workloads" > "$TMP/matrix" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
net = {l.split()[0]: l.split()[2] for l in open(sys.argv[2])}
kind = {l.split()[0]: l.split()[1] for l in open(sys.argv[2])}
ok = len(re.findall(r"^  ok ", text, re.M))
bad = len(re.findall(r"^  FAIL ", text, re.M))
print(f"# expectations: {ok} held, {bad} failed")
part = text.split("connectivity (IPv4", 1)
if len(part) < 2:
    print("# matrix: not printed"); sys.exit()
lines = part[1].splitlines()
heads = lines[1].split()
targets = [h.rsplit(":", 1)[0] for h in heads]
denied = set(re.findall(r"^  (\S+) -> (\S+?):\d+  denied", part[1], re.M))
cells = {}
for l in lines[2:]:
    if not l.strip():
        break
    f = l.split()
    for t, c in zip(targets, f[1:]):
        cells[(f[0], t)] = c
yes = sum(1 for c in cells.values() if c == "yes")
no = [k for k, c in cells.items() if c == "no"]
iso = [k for k in no if k not in denied and k[0] in net and k[1] in net and net[k[0]] != net[k[1]]]
unexplained = [k for k in no if k not in denied and k not in iso]
vm = [k for k in unexplained if kind.get(k[0]) == "VM" or kind.get(k[1]) == "VM"]
print(f"# matrix (the lab probes all sources at once, 0.7 s a probe): {len({s for s, _ in cells})} sources x {len(targets)} targets: "
      f"{yes} yes, {len(no)} no ({len(denied & set(no))} denied by a policy rule, {len(iso)} across NAT Networks, "
      f"{len(unexplained)} not explained, {len(vm)} of them with a VM at one end)")
for k in sorted(unexplained):
    print("unexplained", k[0], k[1])
for k, c in sorted(cells.items()):
    print("cell", k[0], k[1], c)
PY
grep '^#' "$TMP/matrix"

# The sample, again, one probe at a time: every tenth pod and each listening target that is not
# a VM (a VM's frames need the lab's relay, which ends with weft-lab); the benchmark's own
# listeners. Expected: allow unless the two are on different NAT Networks or the lab's policy
# trace (`weft-lab trace`) denies it. Any disagreement fails the script.
PY_HELP="$HERE/lib/flood.py"
TARGETS=$(sed -n 's/^cell \(\S*\) \(\S*\) .*/\2/p' "$TMP/matrix" | sort -u)
declare -A PORTOF
for hd in $(sed -n '/^connectivity (IPv4/{n;p;q}' "$TMP/lab.out"); do PORTOF[${hd%%:*}]=${hd##*:}; done
SERVED=()
for t in $TARGETS; do
  [ "$(awk -v n="$t" '$1 == n {print $2}' "$TMP/workloads")" = VM ] && continue
  if [ "$t" = outside ]; then ns="wl-$LAB-lan-0"; else ns="wl-$LAB-w-$t"; fi
  ip netns exec "$ns" python3 "$PY_HELP" serve --name "$t" --tcp "${PORTOF[$t]}" >/dev/null 2>&1 &
  echo $! >> "$TMP/serve.pids"
  SERVED+=("$t")
done
sleep 1
addr() { # workload or outside -> its IPv4 address
  if [ "$1" = outside ]; then sed -n 's/^  gateway: \([0-9.]*\).*/\1/p' "$FILE" | head -n1
  else ip -n "wl-$LAB-w-$1" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1; fi
}
SAMPLE=0; AGREE=0; LABNO=0
while read -r src k n; do
  for t in "${SERVED[@]}"; do
    [ "$t" = "$src" ] && continue
    tn=$(awk -v n="$t" '$1 == n {print $3}' "$TMP/workloads")
    if [ "$t" != outside ] && [ "$tn" != "$n" ]; then want=no
    elif "$BIN/weft-lab" trace --file "$FILE" --from "$src" --to "$t" --port "${PORTOF[$t]}" >/dev/null 2>&1; then want=yes
    else want=no; fi
    got=$(ip netns exec "wl-$LAB-w-$src" python3 "$PY_HELP" connect --dst "$(addr "$t")" --port "${PORTOF[$t]}" --count 1 --timeout 2 |
      python3 -c 'import json,sys; print("yes" if json.load(sys.stdin)["ok"] else "no")')
    lab=$(awk -v s="$src" -v t="$t" '$1 == "cell" && $2 == s && $3 == t {print $4}' "$TMP/matrix")
    SAMPLE=$((SAMPLE + 1))
    [ "$got" = "$want" ] && AGREE=$((AGREE + 1))
    [ "$got" = yes ] && [ "$lab" = no ] && LABNO=$((LABNO + 1))
    [ "$got" = "$want" ] || echo "# sample: $src -> $t:${PORTOF[$t]} expected $want, got $got" >&2
  done
done < <(awk '$2 != "VM"' "$TMP/workloads" | awk 'NR % 10 == 0')
for p in $(cat "$TMP/serve.pids"); do kill "$p" 2>/dev/null || true; done
SAMPLELINE="sample probed one at a time: $SAMPLE pairs ($(awk '$2 != "VM"' "$TMP/workloads" | awk 'NR % 10 == 0' | wc -l) pods x ${#SERVED[@]} targets), $AGREE as the policies and NAT isolation say; $LABNO of the answered ones were 'no' in the lab's matrix"
echo "# $SAMPLELINE" >&2
[ "$SAMPLE" -gt 0 ] && [ "$AGREE" = "$SAMPLE" ] || die "the sequential sample disagrees with the policies: $SAMPLELINE"

# Start times: first and last endpoint as the agent saw them.
read -r FIRST LAST <<<"$(python3 - "$TMP/endpoints" "$WANT" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])] if sys.argv[1] else []
want = int(sys.argv[2])
first = next((float(t) for t, n in rows if int(n) >= 1), float("nan"))
last = next((float(t) for t, n in rows if int(n) >= want), float("nan"))
print(first, last)
PY
)"
# ADD durations from the histogram.
ADD=$(python3 - "$TMP/metrics.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
b = [(float("inf") if le == "+Inf" else float(le), float(v)) for le, v in
     re.findall(r'^weft_agent_cni_duration_seconds_bucket\{le="([^"]+)",command="ADD"\} (\S+)', text, re.M)]
s = re.search(r'^weft_agent_cni_duration_seconds_sum\{command="ADD"\} (\S+)', text, re.M)
c = re.search(r'^weft_agent_cni_duration_seconds_count\{command="ADD"\} (\S+)', text, re.M)
if not b or not c:
    print("n/a"); sys.exit()
n = float(c.group(1))
def q(p):
    want, lo_le, lo_n = p * n, 0.0, 0.0
    for le, cum in sorted(b):
        if cum >= want:
            if le == float("inf"):
                return lo_le
            return lo_le + (le - lo_le) * ((want - lo_n) / (cum - lo_n) if cum > lo_n else 0)
        lo_le, lo_n = le, cum
print("%d ADDs: mean %.1f ms, p50 ~%.1f ms, p95 ~%.1f ms (histogram)" % (n, 1e3 * float(s.group(1)) / n, 1e3 * q(0.5), 1e3 * q(0.95)))
PY
)
proc() { # pid -> "RSS_kB CPU_seconds"
  echo "$(awk '/^VmRSS/ {print $2}' "/proc/$1/status") $(awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat")"
}
read -r RSS0 CPU0 <<<"$(proc "$AGENT")"
count_objects() {
  ip netns exec "$NODENS" nft -j list ruleset > "$TMP/ruleset.json"
  python3 - "$TMP/ruleset.json" <<'PY'
import json, sys
objs = json.load(open(sys.argv[1]))["nftables"]
kinds = {}
elems = 0
for o in objs:
    for k, v in o.items():
        if k == "metainfo":
            continue
        kinds[k] = kinds.get(k, 0) + 1
        if k in ("set", "map"):
            elems += len(v.get("elem", []))
print("nftables: %d tables, %d chains, %d rules, %d sets, %d maps, %d set/map elements" % (
    kinds.get("table", 0), kinds.get("chain", 0), kinds.get("rule", 0), kinds.get("set", 0),
    kinds.get("map", 0), elems))
PY
  local q f l
  q=$(ip netns exec "$NODENS" tc qdisc show | wc -l)
  f=0
  for l in $(ip -n "$NODENS" -o link show | awk -F': ' '{sub(/@.*/, "", $2); print $2}'); do
    for d in ingress egress; do
      f=$((f + $(tc -n "$NODENS" -j filter show dev "$l" "$d" 2>/dev/null | python3 -c 'import json,sys; t=sys.stdin.read().strip(); print(sum(1 for x in (json.loads(t) if t else []) if "options" in x))')))
    done
  done
  echo "tc: $q qdiscs, $f filters (ingress and egress of every link)"
  echo "links: $(ip -n "$NODENS" -o -d link show | python3 -c '
import collections, re, sys
c = collections.Counter()
for l in sys.stdin:
    kind = re.search(r"\s(veth|bridge|ifb|vlan|dummy|tun|vxlan)\s", l)
    c[kind.group(1) if kind else ("loopback" if "link/loopback" in l else "other")] += 1
print(sum(c.values()), "(" + ", ".join("%s %d" % kv for kv in sorted(c.items())) + ")")')"
}
OBJ=$(count_objects)
echo "# idle for $IDLE s" >&2
read -r _ CPUI <<<"$(proc "$AGENT")"
SLICES=""
for _ in $(seq 1 $((IDLE / 10))); do
  a=$(proc "$AGENT" | cut -d' ' -f2); sleep 10; b=$(proc "$AGENT" | cut -d' ' -f2)
  SLICES+=" $(python3 -c "print('%.0f' % (10 * ($b - $a)))")"
done
read -r RSS1 CPU1 <<<"$(proc "$AGENT")"
kill -0 "$AGENT" 2>/dev/null || die "the agent died while idle"
CPUPCT=$(python3 -c "print('%.1f' % (100 * ($CPU1 - $CPUI) / $IDLE))")

echo "# kernel $(uname -r), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg), tree at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), binaries $BIN (weft-operator built $(date -u -r "$BIN/weft-operator" +%FT%TZ), weft $(date -u -r "$BIN/weft" +%FT%TZ))"
echo "lab $FILE: $WANT workloads on one node; weft-lab ran $WALL s in all (start, expectations, matrix)"
echo "start: the agent had its first endpoint after $FIRST s and all $WANT after $LAST s (read every 0.5 s)"
echo "CNI ADD as the weft binary reported it: $ADD"
grep '^# \(expectations\|matrix\)' "$TMP/matrix" | sed 's/^# //'
echo "$SAMPLELINE"
echo "agent: RSS $((RSS0 / 1024)) MiB and CPU time $CPU0 s right after the lab; then (after the sample's probes) $IDLE s idle: RSS $((RSS1 / 1024)) MiB at the end, CPU $CPUPCT % of a core (by 10 s slices:$SLICES %)"
echo "$OBJ"
