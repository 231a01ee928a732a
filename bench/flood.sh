#!/usr/bin/env bash
# flood.sh — a SYN flood and a UDP flood against one workload behind a port forward: what its
# legitimate clients get, what the node's other workloads get, how soon the agent reports it;
# how soon the brute-force guard bans a source; what the limits cost a CNI ADD.
#
# usage: bench/flood.sh [-t SECONDS] [-r REPS] [--rate PPS] [--budget N] [--legit N]
#                       [--conn-rate N] [--no-syn] [--no-synproxy] [--no-udp] [--ban-reps N]
#                       [--cni-runs R] [--cni-n N] [--no-flood] [--no-cni]
#   One lab (`weft-lab --keep`, one node, a NAT Network with `limits: {conntrackEntries: N}`,
#   --budget, default 2000): workloads `victim` (port forwards 8080 -> 80/tcp, a one-line
#   answer; 5201 -> iperf3; 5353 -> 53/udp, answered), `other` (5202 -> iperf3) and `guarded`
#   (2222 -> 22/tcp with `bruteForce: {maxNewConnectionsPerMinute: 5}`). The agent gets
#   `--anomaly-connections-per-second` (--conn-rate, default 1000; 0: not set) through its
#   environment (WEFT_ANOMALY_CONNECTIONS_PER_SECOND), so floods also raise `connection-rate`.
#   Floods and clients run in the outside host's namespace (the LAN's gateway).
#   Each rep runs four phases, in an order that rotates by rep: no flood; the generator alone
#   (the SYN flood sent into a veth pair inside the outside host's own namespace, never to the
#   node: what generating and sending it takes of the two cores); a SYN flood; a UDP flood
#   (--rate PPS, default 5000 a second, spoofed sources from 198.18.0.0/15 and random source
#   ports, from bench/lib/flood.py's raw socket; the SYNs to node port 8080, the datagrams to
#   5353); and the same SYN flood against node port 8443, the victim's port 80 again through
#   a forward with `synProxy: {}` (the agent runs with --syn-proxy, as weft-lab's always do),
#   whose new clients connect to 8443 too. In each phase, with the flood on from 0.5 s in:
#     1. iperf3 to the victim (port 5201), connected before the flood starts, -O 1 -t SECONDS:
#        an established client of the victim;
#     2. iperf3 to `other` through its own port forward, -t SECONDS (goal: >= 90 % of no flood);
#     3. --legit N (default 20) sequential new connections to the victim (8080), 1 s each to
#        be answered: the victim's new legitimate clients' success rate;
#     then the node's conntrack entries, and the flood stops (a flood lasts about 2 x SECONDS +
#     N s, 31 s by default). After a flood phase but the SYN proxy's: the victim's limit drop counter must have grown and the anomaly (`conntrack-budget`; `connection-rate`
#     with --conn-rate) must be in the node's audit log, else the script fails; time to detect
#     = the record's time minus the flood's first packet (goal < 3 s); time to recover = from the
#     flood's end (and start) to the victim's first answered new connection (every 0.5 s); then it waits
#     for the node's conntrack entries to drain and the anomalies to end before the next phase.
#   Ban (--ban-reps, default 5): each rep adds a new address to the outside host and connects
#   from it to node port 2222 one connection after the other until one is not answered; time
#   to ban = the `ban` audit record's time minus the first attempt (and minus the attempt that
#   was refused). It fails if no attempt is refused, if no record names the source or if
#   another new address of the outside host is not answered right after.
#   CNI (--cni-runs R, default 3; --cni-n N pods, default 100): bench/cni-bench-weft.sh -n N -c 8
#   --runs 1, R times each without limits, with WEFT_BENCH_LIMITS='{conntrackEntries: 1000,
#   newConnectionsPerSecond: 100, egressBandwidth: 100M}' and with the connection limits alone
#   ('{conntrackEntries: 1000, newConnectionsPerSecond: 100}'), interleaved (the order rotates by
#   round); medians of ADD p50 and pods/s, sequential and 8-way, and the ratios (goal: within
#   10 %). Fails if a run with limits never had them in force (pod addresses in a limit class
#   set, and shaping links with the bandwidth), or if a run failed an operation or leaked links,
#   addresses or namespaces.
# Runs the real agent and CNI (debug build from `cargo build --workspace`, or WEFT_BIN_DIR);
# root, iperf3, python3, nft. The lab, its processes and the added addresses go on exit, also on
# failure or Ctrl-C.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 2; }
for c in iperf3 python3 nft ip; do
  command -v "$c" >/dev/null || { echo "missing $c" >&2; exit 2; }
done
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${WEFT_BIN_DIR:-$ROOT/target/debug}"
T=5; REPS=3; RATE=5000; BUDGET=2000; LEGIT=20; CONNRATE=1000; SYN=1; SYNP=1; UDP=1; BANREPS=5
CNIRUNS=3; CNIN=100; FLOOD=1; CNI=1
usage() { sed -n '/^# usage: /,/^#   One lab/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# //; s/^#//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    -t) T="$2"; shift 2;; -r) REPS="$2"; shift 2;;
    --rate) RATE="$2"; shift 2;; --budget) BUDGET="$2"; shift 2;;
    --legit) LEGIT="$2"; shift 2;; --conn-rate) CONNRATE="$2"; shift 2;;
    --no-syn) SYN=""; shift;; --no-synproxy) SYNP=""; shift;; --no-udp) UDP=""; shift;;
    --ban-reps) BANREPS="$2"; shift 2;;
    --cni-runs) CNIRUNS="$2"; shift 2;; --cni-n) CNIN="$2"; shift 2;;
    --no-flood) FLOOD=""; shift;; --no-cni) CNI=""; shift;;
    -h|--help) usage;;
    *) echo "unknown argument: $1" >&2; usage;;
  esac
done
[ -x "$BIN/weft-lab" ] || { echo "missing $BIN/weft-lab (cargo build --workspace)" >&2; exit 2; }
for b in weft weft-operator; do
  [ -x "$BIN/$b" ] || { echo "missing $BIN/$b (cargo build --workspace)" >&2; exit 2; }
done
TMP="$(mktemp -d /tmp/weft-flood.XXXXXX)"
LABS=()
NAMES=()
FLOODPID=""
# shellcheck source=lib/labs.sh
source "$HERE/lib/labs.sh"
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$FLOODPID" ] && kill "$FLOODPID" 2>/dev/null || true
  labs_down
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
die() { echo "flood: $*" >&2; exit 1; }
PY="$HERE/lib/flood.py"
LAB=wflood
NODE=192.168.73.11
LANNS="wl-$LAB-lan-0"
NODENS="wl-$LAB-n-node-a"
AUDIT="/run/weft-lab/$LAB/node-a/audit.jsonl"
j() { python3 -c "import json,sys; v=json.load(open(sys.argv[1]))$2; print(v if v is not None else '')" "$1"; }
f2() { python3 -c "import sys; print('%.2f' % float(sys.argv[1]))" "$1"; }
ct_count() { ip netns exec "$NODENS" cat /proc/sys/net/netfilter/nf_conntrack_count; }

# ---------------------------------------------------------------------------------------------
# Floods, detection, the brute-force guard.
declare -A OTH VIC LEG DET_CB DET_CR REC RECS CT SENT DROPS
BANF=""; BANT=""
if [ -n "$FLOOD" ]; then
  cat > "$TMP/$LAB.yaml" <<YAML
lan: {gateway: 192.168.73.1/24}
nodes: [{name: node-a, address: $NODE/24}]
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: bench}
    spec: {mode: NAT, subnets: [10.73.0.0/24], limits: {conntrackEntries: $BUDGET}}
  - apiVersion: weft.dev/v1alpha1
    kind: PortForward
    metadata: {name: victim, namespace: default}
    spec:
      network: bench
      target: {workload: victim}
      ports:
        - {protocol: TCP, port: 8080, targetPort: 80}
        - {protocol: TCP, port: 5201, targetPort: 5201}
        - {protocol: UDP, port: 5353, targetPort: 53}
  - apiVersion: weft.dev/v1alpha1
    kind: PortForward
    metadata: {name: victim-proxied, namespace: default}
    spec:
      network: bench
      target: {workload: victim}
      ports: [{protocol: TCP, port: 8443, targetPort: 80}]
      synProxy: {}
  - apiVersion: weft.dev/v1alpha1
    kind: PortForward
    metadata: {name: other, namespace: default}
    spec:
      network: bench
      target: {workload: other}
      ports: [{protocol: TCP, port: 5202, targetPort: 5201}]
  - apiVersion: weft.dev/v1alpha1
    kind: PortForward
    metadata: {name: ssh, namespace: default}
    spec:
      network: bench
      target: {workload: guarded}
      ports: [{protocol: TCP, port: 2222, targetPort: 22}]
      bruteForce: {maxNewConnectionsPerMinute: 5, banSeconds: 300}
workloads:
  - {name: victim, node: node-a, networks: [bench]}
  - {name: other, node: node-a, networks: [bench]}
  - {name: guarded, node: node-a, networks: [bench]}
expect:
  - {from: outside, to: node-a, port: 8080, protocol: tcp, result: allow, answeredBy: victim}
  - {from: outside, to: node-a, port: 8443, protocol: tcp, result: allow, answeredBy: victim}
  - {from: outside, to: node-a, port: 5353, protocol: udp, result: allow, answeredBy: victim}
  - {from: outside, to: node-a, port: 5202, protocol: tcp, result: allow, answeredBy: other}
  - {from: outside, to: node-a, port: 2222, protocol: tcp, result: allow, answeredBy: guarded}
YAML
  LABS+=("$TMP/$LAB.yaml"); NAMES+=("$LAB")
  ENVS=()
  [ "$CONNRATE" != 0 ] && ENVS+=("WEFT_ANOMALY_CONNECTIONS_PER_SECOND=$CONNRATE")
  env "${ENVS[@]}" "$BIN/weft-lab" "$TMP/$LAB.yaml" --keep --name "$LAB" > "$TMP/lab.out" 2>&1 ||
    { cat "$TMP/lab.out" >&2; die "the lab failed"; }
  VICTIM=$(ip -n "wl-$LAB-w-victim" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
  [ -n "$VICTIM" ] || die "the victim has no address"
  # The lab's own listeners end with weft-lab; the benchmark's take their ports.
  ip netns exec "wl-$LAB-w-victim" python3 "$PY" serve --name victim --tcp 80 --udp 53 >/dev/null 2>&1 &
  echo $! > "$TMP/serve-victim.pid"
  ip netns exec "wl-$LAB-w-guarded" python3 "$PY" serve --name guarded --tcp 22 >/dev/null 2>&1 &
  echo $! > "$TMP/serve-guarded.pid"
  ip netns exec "wl-$LAB-w-victim" iperf3 -s -D -I "$TMP/iperf-victim.pid" >/dev/null
  ip netns exec "wl-$LAB-w-other" iperf3 -s -D -I "$TMP/iperf-other.pid" >/dev/null
  sleep 1
  legit() { # N TIMEOUT [PORT] -> JSON of the connect run
    ip netns exec "$LANNS" python3 "$PY" connect --dst "$NODE" --port "${3:-8080}" --count "$1" --timeout "$2"
  }
  [ "$(legit 3 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["ok"])')" = 3 ] ||
    die "the victim's listener does not answer through node port 8080"
  AGENT=$(pgrep -f -- "--state-dir /run/weft-lab/$LAB/node-a/state" | head -n1 || true)
  [ -n "$AGENT" ] || die "no agent process for the lab"
  if [ "$CONNRATE" != 0 ]; then
    tr '\0' '\n' < "/proc/$AGENT/environ" | grep -q "^WEFT_ANOMALY_CONNECTIONS_PER_SECOND=$CONNRATE$" ||
      die "the agent did not get WEFT_ANOMALY_CONNECTIONS_PER_SECOND"
  fi
  echo "# lab $LAB up: victim $VICTIM, budget $BUDGET conntrack entries, agent pid $AGENT; flood $RATE/s from spoofed 198.18.0.0/15" >&2

  open_anomalies() { # how many anomalies of the victim started and not ended
    local s e
    s=$(python3 "$PY" audit --file "$AUDIT" --after 0 --verdict anomaly --workload default/victim --state started | python3 -c 'import json,sys; print(json.load(sys.stdin)["records"])')
    e=$(python3 "$PY" audit --file "$AUDIT" --after 0 --verdict anomaly --workload default/victim --state ended | python3 -c 'import json,sys; print(json.load(sys.stdin)["records"])')
    echo $((s - e))
  }
  settle() { # the node's table drained of the last flood, the victim's anomalies over
    local i
    for i in $(seq 1 300); do
      [ "$(ct_count)" -lt 100 ] && [ "$(open_anomalies)" = 0 ] && return 0
      sleep 1
    done
    die "after 300 s the node still holds $(ct_count) conntrack entries or the victim has $(open_anomalies) open anomalies"
  }
  gbps() { python3 -c 'import json,sys; print("%.2f" % (json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"]/1e9))' "$1" 2>/dev/null; }

  phase() { # none|gen|syn|synp|udp
    local k="$1" d0 d1 v o l t0 det lport=8080
    [ "$k" = synp ] && lport=8443
    settle
    d0=$(python3 "$PY" drops --netns "$NODENS" "$VICTIM")
    timeout $((T + 30)) ip netns exec "$LANNS" iperf3 -c "$NODE" -p 5201 -O 1 -t "$T" -J --connect-timeout 3000 > "$TMP/v.json" 2>&1 &
    local vp=$!
    sleep 0.5
    if [ "$k" != none ]; then
      local proto=tcp port=8080 dst=$NODE
      [ "$k" = udp ] && { proto=udp; port=5353; }
      [ "$k" = synp ] && port=8443
      [ "$k" = gen ] && dst=198.51.100.1
      ip netns exec "$LANNS" python3 "$PY" send --proto "$proto" --dst "$dst" --dport "$port" \
        --rate "$RATE" --seconds 300 --spoof 198.18.0.0/15 > "$TMP/flood.json" &
      FLOODPID=$!
    fi
    wait "$vp" || true
    v=$(gbps "$TMP/v.json") || die "$k: iperf3 to the victim failed: $(head -c 300 "$TMP/v.json")"
    timeout $((T + 30)) ip netns exec "$LANNS" iperf3 -c "$NODE" -p 5202 -t "$T" -J --connect-timeout 3000 > "$TMP/o.json" 2>&1 || true
    o=$(gbps "$TMP/o.json") || die "$k: iperf3 to other failed: $(head -c 300 "$TMP/o.json")"
    legit "$LEGIT" 1 "$lport" > "$TMP/legit.json"
    l=$(j "$TMP/legit.json" '["ok"]')
    CT[$k]+=" $(ct_count)"
    VIC[$k]+=" $v"; OTH[$k]+=" $o"; LEG[$k]+=" $l"
    if [ "$k" = gen ]; then
      kill -TERM "$FLOODPID"; wait "$FLOODPID" || true; FLOODPID=""
      SENT[$k]+=" $(j "$TMP/flood.json" '["sent"]')"
    fi
    if [ "$k" = none ] || [ "$k" = gen ]; then
      echo "# $k: victim (established) $v Gbit/s, other $o Gbit/s, legit $l/$LEGIT, node conntrack entries ${CT[$k]##* }" >&2
      return
    fi
    kill -TERM "$FLOODPID"; wait "$FLOODPID" || true; FLOODPID=""
    if [ "$k" = synp ]; then
      # The proxy answers the flood itself: nothing reaches the victim or its budget.
      SENT[$k]+=" $(j "$TMP/flood.json" '["sent"]')"
      d1=$(python3 "$PY" drops --netns "$NODENS" "$VICTIM")
      DROPS[$k]+=" $((d1 - d0))"
      echo "# $k: victim (established) $v Gbit/s, other $o Gbit/s, legit $l/$LEGIT (port 8443), node conntrack entries ${CT[$k]##* }, sent $(j "$TMP/flood.json" '["sent"]'), budget drops $((d1 - d0))" >&2
      return
    fi
    local end; end=$(python3 -c 'import time; print(time.time())')
    t0=$(j "$TMP/flood.json" '["start"]')
    SENT[$k]+=" $(j "$TMP/flood.json" '["sent"]')"
    d1=$(python3 "$PY" drops --netns "$NODENS" "$VICTIM")
    DROPS[$k]+=" $((d1 - d0))"
    [ $((d1 - d0)) -gt 0 ] || die "$k: the victim's conntrack budget dropped nothing (the flood did not fill it): no figure"
    det=$(python3 "$PY" audit --file "$AUDIT" --after "$t0" --verdict anomaly --kind conntrack-budget --workload default/victim --state started | python3 -c 'import json,sys; s=json.load(sys.stdin)["seconds"]; print("None" if s is None else "%.2f" % s)')
    [ "$det" != None ] || die "$k: no conntrack-budget anomaly for the victim in $AUDIT"
    DET_CB[$k]+=" $det"
    if [ "$CONNRATE" != 0 ]; then
      det=$(python3 "$PY" audit --file "$AUDIT" --after "$t0" --verdict anomaly --kind connection-rate --workload default/victim --state started | python3 -c 'import json,sys; s=json.load(sys.stdin)["seconds"]; print("None" if s is None else "%.2f" % s)')
      [ "$det" != None ] || die "$k: no connection-rate anomaly for the victim in $AUDIT"
      DET_CR[$k]+=" $det"
    fi
    local rec s0
    s0=$(python3 -c 'import time; print(time.time())')
    rec=$(ip netns exec "$LANNS" python3 "$PY" until-ok --dst "$NODE" --port 8080 --timeout 0.5 --interval 0.5 --max 300 |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["seconds"])')
    [ "$rec" != None ] || die "$k: the victim took no new connection within 300 s of the flood's end"
    rec=$(python3 -c "import sys; print('%.1f' % (float(sys.argv[1]) + float(sys.argv[2]) - float(sys.argv[3])))" "$rec" "$s0" "$end")
    REC[$k]+=" $rec"
    RECS[$k]+=" $(python3 -c "import sys; print('%.1f' % (float(sys.argv[1]) + float(sys.argv[2]) - float(sys.argv[3])))" "$rec" "$end" "$t0")"
    echo "# $k: victim (established) $v Gbit/s, other $o Gbit/s, legit $l/$LEGIT, node conntrack entries ${CT[$k]##* }, sent $(j "$TMP/flood.json" '["sent"]'), budget drops $((d1 - d0)), detected after $(f2 "${DET_CB[$k]##* }") s (conntrack-budget)${DET_CR[$k]:+ / $(f2 "${DET_CR[$k]##* }") s (connection-rate)}, new connections answered again ${rec} s after the flood" >&2
  }

  # The control: the same SYN flood generated in the outside host's namespace and sent into a
  # veth pair of its own (the other end drops it: not its address, no forwarding); it never
  # reaches the node (what generating and sending it takes of the cores).
  ip -n "$LANNS" link add fl0 type veth peer name fl1
  ip -n "$LANNS" link set fl1 up
  ip -n "$LANNS" link set fl0 up
  ip -n "$LANNS" addr add 198.51.100.254/24 dev fl0
  ip -n "$LANNS" neigh replace 198.51.100.1 lladdr 02:00:00:00:00:01 dev fl0
  KINDS=(none gen)
  [ -n "$SYN" ] && KINDS+=(syn)
  [ -n "$SYNP" ] && KINDS+=(synp)
  [ -n "$UDP" ] && KINDS+=(udp)
  for r in $(seq 1 "$REPS"); do
    for i in $(seq 0 $((${#KINDS[@]} - 1))); do
      phase "${KINDS[$(( (i + r - 1) % ${#KINDS[@]} ))]}"
    done
  done

  # The brute-force guard: a new source each rep.
  for r in $(seq 1 "$BANREPS"); do
    src="192.168.73.$((200 + r))"
    ip -n "$LANNS" addr add "$src/24" dev lan0
    ip netns exec "$LANNS" python3 "$PY" ban --dst "$NODE" --port 2222 --src "$src" --timeout 1 --max 30 > "$TMP/ban.json"
    at=$(j "$TMP/ban.json" '["denied_at"]')
    [ -n "$at" ] || die "ban: 30 connections from $src to port 2222 were all answered"
    first=$(j "$TMP/ban.json" '["attempts"][0][0]')
    refused=$(j "$TMP/ban.json" "[\"attempts\"][$at][0]")
    for _ in $(seq 1 50); do
      b=$(python3 "$PY" audit --file "$AUDIT" --after "$first" --verdict ban --src "$src" | python3 -c 'import json,sys; s=json.load(sys.stdin)["seconds"]; print("None" if s is None else "%.3f" % s)')
      [ "$b" != None ] && break
      sleep 0.1
    done
    [ "$b" != None ] || die "ban: no ban record for $src in $AUDIT"
    BANF+=" $b"
    BANT+=" $(python3 -c "import sys; print('%.3f' % (float(sys.argv[1]) + float(sys.argv[2]) - float(sys.argv[3])))" "$b" "$first" "$refused")"
    # Another source is not banned.
    other="192.168.73.$((150 + r))"
    ip -n "$LANNS" addr add "$other/24" dev lan0
    ok=$(ip netns exec "$LANNS" python3 "$PY" connect --dst "$NODE" --port 2222 --src "$other" --count 1 --timeout 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["ok"])')
    [ "$ok" = 1 ] || die "ban: another source ($other) was not answered on port 2222 after $src was banned"
    echo "# ban $r: $src refused at attempt $((at + 1)), ban record $(f2 "$b") s after the first attempt; another source answered" >&2
  done
  LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
  AGENTCPU=$(awk '{print ($14 + $15) / '"$(getconf CLK_TCK)"'}' "/proc/$AGENT/stat")
  labs_down; LABS=(); NAMES=(); TMP="$(mktemp -d /tmp/weft-flood.XXXXXX)"
fi

# ---------------------------------------------------------------------------------------------
# CNI ADD with and without limits.
declare -A ADDS ADDC PPSS PPSC LEAKS
LIMITS='{conntrackEntries: 1000, newConnectionsPerSecond: 100, egressBandwidth: 100M}'
LIMITS_CONN='{conntrackEntries: 1000, newConnectionsPerSecond: 100}'
if [ -n "$CNI" ]; then
  cni_once() { # none|limits
    local out="$TMP/cni-$1.out" json="$TMP/cni-$1.jsonl" rc=0
    : > "$json"
    case "$1" in
      limits|conn)
        local l="$LIMITS"; [ "$1" = conn ] && l="$LIMITS_CONN"
        WEFT_BIN_DIR="$BIN" WEFT_BENCH_LIMITS="$l" "$HERE/cni-bench-weft.sh" -n "$CNIN" -c 8 --runs 1 --json "$json" > "$out" 2>&1 || rc=$?
        if [ "$1" = limits ]; then
          grep -q 'in force: up to [1-9][0-9]* pod addresses .* and [1-9][0-9]* shaping' "$out" ||
            { tail -5 "$out" >&2; die "the limits were never seen in force during a limits run"; }
        else
          grep -q 'in force: up to [1-9][0-9]* pod addresses' "$out" ||
            { tail -5 "$out" >&2; die "the connection limits were never seen in force during a run"; }
        fi;;
      *)
        WEFT_BIN_DIR="$BIN" "$HERE/cni-bench-weft.sh" -n "$CNIN" -c 8 --runs 1 --json "$json" > "$out" 2>&1 || rc=$?;;
    esac
    # The harness fails a run with leaks. Failed operations or leaked links, addresses or
    # namespaces void the timing; ruleset lines that still name a deleted pod's address are
    # reported with the figures.
    local leaks
    leaks=$(python3 - "$json" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
if len(rows) != 2 or any(r["failures"] or r["leaked_veth"] or r["leaked_ipam"] or r["leaked_netns"] for r in rows):
    print("void")
else:
    print(" ".join("%s:%d" % (r["mode"], r["leaked_rules"]) for r in rows))
PY
)
    if [ "$leaks" = void ]; then tail -20 "$out" >&2; die "cni-bench-weft.sh ($1) failed (exit $rc)"; fi
    LEAKS[$1]+=" $leaks"
    read -r s c ps pc <<<"$(python3 - "$json" <<'PY'
import json, sys
rows = {r["mode"]: r for r in map(json.loads, open(sys.argv[1]))}
print("%.2f %.2f %.1f %.1f" % (rows["seq"]["add_p50"], rows["conc"]["add_p50"],
                               rows["seq"]["add_pods_s"], rows["conc"]["add_pods_s"]))
PY
)"
    ADDS[$1]+=" $s"; ADDC[$1]+=" $c"; PPSS[$1]+=" $ps"; PPSC[$1]+=" $pc"
    echo "# cni $1: ADD p50 seq $s ms, 8-way $c ms; pods/s seq $ps, 8-way $pc; $(grep '^agent:' "$out" | sed 's/^agent: //')$(grep '^limits' "$out" | sed 's/^limits ([^)]*): /; /')" >&2
  }
  VARIANTS=(none limits conn)
  for r in $(seq 1 "$CNIRUNS"); do
    for i in 0 1 2; do cni_once "${VARIANTS[$(( (i + r - 1) % 3 ))]}"; done
  done
fi

# ---------------------------------------------------------------------------------------------
echo "# kernel $(uname -r), $(nproc) CPUs, weft $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), binaries $BIN"
if [ -n "$FLOOD" ]; then
  echo "# load average at the end of the floods: $LOAD; the agent's CPU time over the whole lab: $AGENTCPU s"
  # shellcheck disable=SC2086
  {
    NO=$(med ${OTH[none]}); NV=$(med ${VIC[none]})
    echo "no flood (median of $REPS, -t $T): other $NO Gbit/s; victim, established client $NV Gbit/s; victim's new clients answered: median $(med ${LEG[none]})/$LEGIT; node conntrack entries $(med ${CT[none]})"
    G=$(med ${OTH[gen]}); GV=$(med ${VIC[gen]})
    echo "generator only (the SYN flood sent into a veth pair in the outside host's namespace, $RATE/s; median of $REPS): other $G Gbit/s = $(pct "$G" "$NO") % of no flood; victim, established client $GV Gbit/s = $(pct "$GV" "$NV") %"
    for k in syn udp; do
      [ -n "${OTH[$k]:-}" ] || continue
      O=$(med ${OTH[$k]}); V=$(med ${VIC[$k]})
      what="SYN flood"; [ $k = udp ] && what="UDP flood"
      echo "$what ($RATE/s, spoofed; median of $REPS): other $O Gbit/s = $(pct "$O" "$NO") % of no flood (goal >= 90 %), $(pct "$O" "$G") % of the generator alone; victim, established client $V Gbit/s = $(pct "$V" "$NV") %; victim's new clients answered during the flood: median $(med ${LEG[$k]})/$LEGIT (all: ${LEG[$k]# }); node conntrack entries $(med ${CT[$k]}) (budget $BUDGET)"
      echo "  detected (conntrack-budget) after $(med ${DET_CB[$k]}) s median [${DET_CB[$k]# } ] (goal < 3 s)${DET_CR[$k]:+; connection-rate (> $CONNRATE/s) after $(med ${DET_CR[$k]}) s [${DET_CR[$k]# } ]}; new connections answered again $(med ${REC[$k]}) s after the flood's end [${REC[$k]# } ], $(med ${RECS[$k]}) s after its start [${RECS[$k]# } ]; flood packets sent [${SENT[$k]# } ], budget drops [${DROPS[$k]# } ]"
    done
    if [ -n "${OTH[synp]:-}" ]; then
      O=$(med ${OTH[synp]}); V=$(med ${VIC[synp]})
      echo "SYN flood against the SYN-proxied forward (node port 8443, $RATE/s, spoofed; median of $REPS): other $O Gbit/s = $(pct "$O" "$NO") % of no flood (goal >= 90 %), $(pct "$O" "$G") % of the generator alone; victim, established client $V Gbit/s = $(pct "$V" "$NV") %; victim's new clients (port 8443) answered during the flood: median $(med ${LEG[synp]})/$LEGIT (all: ${LEG[synp]# }); node conntrack entries $(med ${CT[synp]}) (budget $BUDGET); flood packets sent [${SENT[synp]# } ], budget drops [${DROPS[synp]# } ]"
    fi
    for k in none gen syn synp udp; do
      [ -n "${OTH[$k]:-}" ] && echo "# $k runs: other [${OTH[$k]# } ] victim [${VIC[$k]# } ] Gbit/s; legit [${LEG[$k]# } ]"
    done
    [ -n "$BANF" ] && echo "ban (maxNewConnectionsPerMinute 5, $BANREPS sources): ban record after the first attempt: median $(python3 -c 'import statistics,sys; print("%.3f" % statistics.median(map(float, sys.argv[1:])))' $BANF) s [$BANF ]; after the refused attempt: median $(python3 -c 'import statistics,sys; print("%.3f" % statistics.median(map(float, sys.argv[1:])))' $BANT) s [$BANT ]"
  }
fi
if [ -n "$CNI" ]; then
  # shellcheck disable=SC2086
  {
    a=$(med ${ADDS[none]}); b=$(med ${ADDS[limits]}); c=$(med ${ADDC[none]}); d=$(med ${ADDC[limits]})
    e=$(med ${ADDS[conn]}); f=$(med ${ADDC[conn]})
    echo "CNI ADD, N=$CNIN, $CNIRUNS interleaved runs each, medians: sequential p50 $a ms without limits, $b ms with $LIMITS ($(pct "$b" "$a") %; goal <= 110 %), $e ms with $LIMITS_CONN ($(pct "$e" "$a") %); 8-way p50 $c / $d / $f ms ($(pct "$d" "$c") % / $(pct "$f" "$c") %); pods/s seq $(med ${PPSS[none]}) / $(med ${PPSS[limits]}) / $(med ${PPSS[conn]}), 8-way $(med ${PPSC[none]}) / $(med ${PPSC[limits]}) / $(med ${PPSC[conn]})"
    echo "# cni runs: seq none [${ADDS[none]# } ] limits [${ADDS[limits]# } ] conn [${ADDS[conn]# } ]; 8-way none [${ADDC[none]# } ] limits [${ADDC[limits]# } ] conn [${ADDC[conn]# } ]"
    echo "# ruleset lines naming a deleted pod's address 2 s after the last DEL (the harness's leaked_rules; links, addresses and namespaces leaked none): none [${LEAKS[none]# } ] limits [${LEAKS[limits]# } ] conn [${LEAKS[conn]# } ]"
  }
fi
