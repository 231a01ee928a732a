#!/usr/bin/env bash
# mirror-iperf.sh — iperf3 between two workloads on one weft NAT bridge, without a mirror and with
# a TrafficMirror that copies every frame of the server's flow to an analyzer pod on the node.
#
# usage: bench/mirror-iperf.sh [-t SECONDS] [-r REPS] [--no-udp] [--no-filter] [--pause-agents]
#   Labs (each one node, a NAT Network, pods `client`, `server` and `ids`, the analyzer):
#     mnone  no TrafficMirror;
#     mboth  a TrafficMirror selecting the server (direction Both, no filter) whose destination
#            is the analyzer (app: ids): every frame to and from the server is copied into the
#            analyzer's veth (tc mirred on the server's host port, docs/mirroring.md);
#     mfilt  (unless --no-filter) the same with `filter: {protocols: [TCP, UDP], ports:
#            [{port: 5201}]}`, which the measured flow matches: the mirror's classic BPF program
#            runs on every frame and the frames are copied.
#   Each rep measures one TCP stream (iperf3 -t SECONDS, client → server) and, unless --no-udp,
#   one UDP stream (iperf3 -u -b 0 -l 1400: received Gbit/s, the path's packet-rate capacity) in
#   every lab in turn, each rep starting one lab later; per-lab medians and the ratio of each
#   mirrored lab's median to mnone's are reported.
#   Before the runs the script checks that mnone's server port has no mirror filter and that a
#   short run in each mirrored lab made its filters copy frames that arrived on the analyzer's
#   eth0; after the runs it prints how many frames were copied. It fails if a mirrored lab
#   copied nothing, so it never reports the ratio of a mirror that was not there.
#   --pause-agents: SIGSTOP the labs' agents during the measurements (SIGCONT afterwards and on
#   exit). The datapath (bridge, nftables, tc) is the kernel's and needs no agent while no
#   workload starts or stops; this takes the agents' own CPU use off the two cores. The script
#   prints each agent's CPU use while idle either way.
# Runs the real agent and CNI through `weft-lab --keep` (debug build from
# `cargo build --workspace`, or WEFT_BIN_DIR), then removes the labs, also on failure or Ctrl-C.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 2; }
command -v iperf3 >/dev/null || { echo "missing iperf3 (apt-get install iperf3)" >&2; exit 2; }
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${WEFT_BIN_DIR:-$ROOT/target/debug}"
T=5; REPS=3; UDP=1; FILTER=1; PAUSE=""
usage() { sed -n 's/^# usage: /usage: /p' "${BASH_SOURCE[0]}" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    -t) T="$2"; shift 2;; -r) REPS="$2"; shift 2;;
    --no-udp) UDP=""; shift;; --no-filter) FILTER=""; shift;;
    --pause-agents) PAUSE=1; shift;;
    -h|--help) usage;;
    *) echo "unknown argument: $1" >&2; usage;;
  esac
done
[ -x "$BIN/weft-lab" ] || { echo "missing $BIN/weft-lab (cargo build --workspace)" >&2; exit 2; }
TMP="$(mktemp -d /tmp/weft-miperf.XXXXXX)"
LABS=()
NAMES=()
agent_pid() { pgrep -f -- "--state-dir /run/weft-lab/$1/node-a/state" | head -n1 || true; }
resume_agents() {
  local n p
  for n in "${NAMES[@]}"; do
    p=$(agent_pid "$n"); [ -n "$p" ] && kill -CONT "$p" 2>/dev/null || true
  done
}
# shellcheck source=lib/labs.sh
source "$HERE/lib/labs.sh"
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  resume_agents
  labs_down
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
die() { echo "mirror-iperf: $*" >&2; exit 1; }

MIRROR='  - apiVersion: weft.dev/v1alpha1
    kind: TrafficMirror
    metadata: {name: server-tap, namespace: default}
    spec:
      sources: {selector: {matchLabels: {app: server}}}
      direction: Both
      destination: {analyzer: {selector: {matchLabels: {app: ids}}}}'

lab() { # name, extra resources (YAML list items) or ""
  local f="$TMP/$1.yaml"
  cat > "$f" <<YAML
lan: {gateway: 192.168.72.1/24}
nodes: [{name: node-a, address: 192.168.72.11/24}]
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: bench}
    spec: {mode: NAT, subnets: [10.89.0.0/24]}
${2:-}
workloads:
  - {name: ids, node: node-a, labels: {app: ids}, networks: [bench]}
  - {name: server, node: node-a, labels: {app: server}, networks: [bench], listen: [5201/tcp, 5201/udp]}
  - {name: client, node: node-a, labels: {app: client}, networks: [bench]}
YAML
  LABS+=("$f")
  NAMES+=("$1")
  "$BIN/weft-lab" "$f" --keep --name "$1" >/dev/null
}

hostport() { # lab, workload -> the host end of the workload's eth0 in the node's namespace
  local idx
  idx=$(ip -n "wl-$1-w-$2" -o link show dev eth0 | sed -nE 's/^[0-9]+: eth0@if([0-9]+):.*/\1/p')
  [ -n "$idx" ] || die "no eth0 in wl-$1-w-$2"
  ip -n "wl-$1-n-node-a" -o link | awk -F': ' -v i="$idx" '$1 == i { sub(/@.*/, "", $2); print $2 }'
}
# The mirred actions on the server's host port: "<ingress actions> <egress actions> <packets>
# <bytes>" (counters summed over both hooks), and where they send the copies.
copies() { # lab
  local hp d; hp=$(hostport "$1" server)
  for d in ingress egress; do
    tc -n "wl-$1-n-node-a" -s -j filter show dev "$hp" "$d" > "$TMP/tc-$d.json" 2>/dev/null || echo '[]' > "$TMP/tc-$d.json"
  done
  python3 - "$TMP/tc-ingress.json" "$TMP/tc-egress.json" <<'PY'
import json, sys
out, pk, by, to = [], 0, 0, set()
for path in sys.argv[1:]:
    n = 0
    text = open(path).read().strip()
    for f in json.loads(text) if text else []:
        for a in f.get("options", {}).get("actions", []):
            if a.get("kind") == "mirred" and a.get("mirred_action") == "mirror":
                n += 1
                to.add(a.get("to_dev", "?"))
                pk += a.get("stats", {}).get("packets", 0)
                by += a.get("stats", {}).get("bytes", 0)
    out.append(n)
print(out[0], out[1], pk, by, ",".join(sorted(to)) or "-")
PY
}
rxb() { # namespace, device -> received bytes
  ip -n "$1" -s -j link show dev "$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["stats64"]["rx"]["bytes"])'
}
portb() { # lab -> bytes through the server's host port (received from the server + sent to it)
  ip -n "wl-$1-n-node-a" -s -j link show dev "$(hostport "$1" server)" |
    python3 -c 'import json,sys; s=json.load(sys.stdin)[0]["stats64"]; print(s["rx"]["bytes"] + s["tx"]["bytes"])'
}
agent_cpu() { # lab -> % of one core the agent used over 2 s
  local p a b; p=$(agent_pid "$1")
  [ -n "$p" ] || { echo "?"; return; }
  a=$(awk '{print $14 + $15}' "/proc/$p/stat"); sleep 2; b=$(awk '{print $14 + $15}' "/proc/$p/stat")
  echo $(( (b - a) * 100 / $(getconf CLK_TCK) / 2 ))
}

lab mnone ""
lab mboth "$MIRROR"
MIRRORED=(mboth)
if [ -n "$FILTER" ]; then
  lab mfilt "$MIRROR
      filter: {protocols: [TCP, UDP], ports: [{port: 5201}]}"
  MIRRORED+=(mfilt)
fi

# The baseline has no mirror filter; each mirrored lab's server port gets one filter per
# direction (the agent installs them once the CNI ADD reported the port wired).
read -r i e _ <<<"$(copies mnone)"
[ "$i" = 0 ] && [ "$e" = 0 ] || die "mnone's server port has mirror filters ($i ingress, $e egress)"
for n in "${MIRRORED[@]}"; do
  for _ in $(seq 1 100); do
    read -r i e _ <<<"$(copies "$n")"
    [ "$i" -ge 1 ] && [ "$e" -ge 1 ] && break
    sleep 0.1
  done
  [ "$i" -ge 1 ] && [ "$e" -ge 1 ] || die "$n: the server's host port has $i ingress and $e egress mirror filters after 10 s (agent log: /run/weft-lab/$n/node-a/agent.log)"
done

iperf_servers

# A short run in each mirrored lab: its filters must count copies, and the copies must arrive
# on the analyzer's eth0. tc counts a GSO frame's segments as packets, the veth counts frames:
# the bytes compare.
gb() { python3 -c "print('%.2f' % (int('$1') / 1e9))"; }
for n in "${MIRRORED[@]}"; do
  read -r _ _ p0 b0 to <<<"$(copies "$n")"
  [ "$to" = "$(hostport "$n" ids)" ] || die "$n: the mirror copies to $to, not to the analyzer's host port $(hostport "$n" ids)"
  a0=$(rxb "wl-$n-w-ids" eth0)
  ip netns exec "wl-$n-w-client" iperf3 -c "$(server_ip "$n")" -t 1 --connect-timeout 3000 >/dev/null 2>&1 || die "$n: iperf3 check run failed"
  read -r _ _ p1 b1 _ <<<"$(copies "$n")"
  a1=$(rxb "wl-$n-w-ids" eth0)
  [ $((p1 - p0)) -ge 1000 ] || die "$n: the mirror copied $((p1 - p0)) packets of a 1 s iperf3 run"
  [ $((a1 - a0)) -ge $(( (b1 - b0) * 9 / 10 )) ] || die "$n: the analyzer's eth0 received $((a1 - a0)) bytes of $((b1 - b0)) copied"
  echo "# check: $n copied $((p1 - p0)) packets, $(gb $((b1 - b0))) GB of a 1 s TCP run to $to; the analyzer's eth0 received $(gb $((a1 - a0))) GB"
done

declare -A CPU
for n in "${NAMES[@]}"; do CPU[$n]=$(agent_cpu "$n"); done
echo "# agents' CPU while idle (% of one core, 2 s): $(for n in "${NAMES[@]}"; do printf '%s %s  ' "$n" "${CPU[$n]}"; done)"
if [ -z "$PAUSE" ]; then
  for n in "${NAMES[@]}"; do
    if [ "${CPU[$n]}" != "?" ] && [ "${CPU[$n]}" -ge 20 ]; then
      echo "# warning: $n's agent used ${CPU[$n]} % of a core while idle; it competes with iperf3 during the runs (--pause-agents stops the agents while measuring)" >&2
    fi
  done
fi

declare -A C0 B0 A0 P0
for n in "${NAMES[@]}"; do
  read -r _ _ c b _ <<<"$(copies "$n")"
  C0[$n]=$c; B0[$n]=$b
  A0[$n]=$(rxb "wl-$n-w-ids" eth0); P0[$n]=$(portb "$n")
done

if [ -n "$PAUSE" ]; then
  for n in "${NAMES[@]}"; do p=$(agent_pid "$n"); [ -n "$p" ] && kill -STOP "$p"; done
fi
declare -A V U
iperf_reps
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
[ -n "$PAUSE" ] && resume_agents

# What the mirrors copied during the runs; none at all fails the benchmark.
declare -A CP
for n in "${NAMES[@]}"; do
  read -r _ _ c1 b1 _ <<<"$(copies "$n")"
  c=$((c1 - ${C0[$n]})); by=$((b1 - ${B0[$n]}))
  a=$(( $(rxb "wl-$n-w-ids" eth0) - ${A0[$n]} )); p=$(( $(portb "$n") - ${P0[$n]} ))
  if [ "$n" = mnone ]; then
    CP[$n]="no mirror: $(gb "$p") GB through the server's port; the analyzer's eth0 received $(gb "$a") GB"
  else # tc's byte count includes each GSO segment's headers, the link's counts a frame's once
    CP[$n]="copied $c packets (GSO segments), $(gb "$by") GB, of the $(gb "$p") GB through the server's port; the analyzer's eth0 received $(gb "$a") GB ($(pct "$a" "$p") %)"
  fi
done
for n in "${MIRRORED[@]}"; do
  read -r _ _ c1 _ _ <<<"$(copies "$n")"
  [ $((c1 - ${C0[$n]})) -gt 0 ] || die "$n copied nothing during the runs: no ratio reported"
done

label() { case "$1" in mnone) echo "no mirror";; mboth) echo "mirror (Both, no filter)";; mfilt) echo "mirror (Both, filter TCP/UDP port 5201)";; esac; }
echo "# kernel $(uname -r), $(nproc) CPUs, load average $LOAD at the end of the runs; agents $([ -n "$PAUSE" ] && echo paused || echo running) during the runs"
# shellcheck disable=SC2086
NONE=$(med ${V[mnone]})
line="mirror iperf3 TCP (${T}s x ${REPS}, median): no mirror ${NONE} Gbit/s"
# shellcheck disable=SC2086
for n in "${MIRRORED[@]}"; do m=$(med ${V[$n]}); line+="; $(label "$n") ${m} Gbit/s ($(pct "$m" "$NONE") %)"; done
echo "$line"
if [ -n "$UDP" ]; then
  # shellcheck disable=SC2086
  UNONE=$(med ${U[mnone]})
  line="mirror iperf3 UDP (-b 0 -l 1400, ${T}s x ${REPS}, median received): no mirror ${UNONE} Gbit/s"
  # shellcheck disable=SC2086
  for n in "${MIRRORED[@]}"; do m=$(med ${U[$n]}); line+="; $(label "$n") ${m} Gbit/s ($(pct "$m" "$UNONE") %)"; done
  echo "$line"
fi
for n in "${NAMES[@]}"; do echo "# $n runs: TCP [${V[$n]:-} ]${UDP:+ UDP [${U[$n]:-} ]}"; done
for n in "${NAMES[@]}"; do echo "# $n: ${CP[$n]}"; done
