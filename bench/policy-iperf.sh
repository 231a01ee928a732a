#!/usr/bin/env bash
# policy-iperf.sh — iperf3 between two workloads on one weft NAT bridge (east-west, through the
# guard table, br_netfilter and the policy chains), with no policy, under a policy set, and under
# a policy whose group holds 10,000 workloads of another node (10,000 set elements).
#
# usage: bench/policy-iperf.sh [-t SECONDS] [-r REPS] [--peers N] [--no-udp] [POLICY_MANIFEST]
#   POLICY_MANIFEST defaults to bench/confs/policies.yaml (200 policies); the script adds a
#   namespace policy that allows iperf3's port (TCP and UDP), so the measured flow passes the
#   whole pipeline.
#   --peers N (default 10000; 0 leaves the scenario out): a third lab whose node has a peers file
#   of N workloads on another node, as their agent would publish them, and a policy whose first
#   ingress rule allows from them (a group set of N addresses the measured flow is looked up in),
#   then the iperf3 rule.
#   Each rep measures one TCP stream (iperf3 -t SECONDS) and, unless --no-udp, one UDP stream
#   (iperf3 -u -b 0 -l 1400: received Gbit/s, the path's packet-rate capacity) in every lab in
#   turn, each rep starting one lab later; the median of the reps is reported.
# Runs the real agent and CNI through `weft-lab --keep` (debug build from
# `cargo build --workspace`, or WEFT_BIN_DIR), then removes the labs, also on failure.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 2; }
command -v iperf3 >/dev/null || { echo "missing iperf3 (apt-get install iperf3)" >&2; exit 2; }
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${WEFT_BIN_DIR:-$ROOT/target/debug}"
T=5; REPS=3; PEERS=10000; UDP=1
while [ $# -gt 0 ]; do
  case "$1" in
    -t) T="$2"; shift 2;; -r) REPS="$2"; shift 2;;
    --peers) PEERS="$2"; shift 2;; --no-udp) UDP=""; shift;;
    *) break;;
  esac
done
POLICIES="$(cd "$(dirname "${1:-$HERE/confs/policies.yaml}")" && pwd)/$(basename "${1:-$HERE/confs/policies.yaml}")"
TMP="$(mktemp -d /tmp/weft-piperf.XXXXXX)"
LABS=()
# shellcheck source=lib/labs.sh
source "$HERE/lib/labs.sh"
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  labs_down
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

lab() { # name, extra resource file or "", extra resources (YAML list items) or ""
  local f="$TMP/$1.yaml"
  cat > "$f" <<YAML
lan: {gateway: 192.168.70.1/24}
nodes: [{name: node-a, address: 192.168.70.11/24}]
resourceFiles: [$( [ -n "$2" ] && echo "$2" )]
resources:
  - apiVersion: weft.dev/v1alpha1
    kind: Network
    metadata: {name: bench}
    spec: {mode: NAT, subnets: [10.89.0.0/24]}
  - apiVersion: weft.dev/v1alpha1
    kind: SegmentationPolicy
    metadata: {name: iperf, namespace: default}
    spec:
      subject: {podSelector: {}}
      ingress: [{name: iperf, action: Allow, protocols: [{protocol: TCP, port: 5201}, {protocol: UDP, port: 5201}]}]
${3:-}
workloads:
  - {name: server, node: node-a, labels: {app: server}, networks: [bench]}
  - {name: client, node: node-a, labels: {app: client}, networks: [bench]}
YAML
  LABS+=("$f")
  "$BIN/weft-lab" "$f" --keep --name "$1" >/dev/null
}

NAMES=(pnone ppol)
lab pnone ""
lab ppol "$POLICIES"
if [ "$PEERS" -gt 0 ]; then
  NAMES+=(ppeers)
  lab ppeers "" "  - apiVersion: weft.dev/v1alpha1
    kind: SegmentationPolicy
    metadata: {name: from-peers, namespace: default}
    spec:
      subject: {podSelector: {}}
      ingress:
        - {name: peers, action: Allow, from: [{pods: {podSelector: {matchLabels: {app: peer}}}}]}
        - {name: iperf, action: Allow, protocols: [{protocol: TCP, port: 5201}, {protocol: UDP, port: 5201}]}"
  # The peers file of a node "other" in the lab's shared peers directory, which node-a's agent
  # reads.
  mkdir -p /run/weft-lab/ppeers/peers
  python3 "$HERE/lib/peers.py" "$PEERS" /run/weft-lab/ppeers/peers/other.json.tmp
  mv /run/weft-lab/ppeers/peers/other.json.tmp /run/weft-lab/ppeers/peers/other.json
  ELEMS=0
  for _ in $(seq 1 300); do
    ELEMS=$( (ip netns exec wl-ppeers-n-node-a nft list table inet weft 2>/dev/null || true) | (grep -oE '10\.90\.[0-9]+\.[0-9]+' || true) | sort -u | wc -l)
    [ "$ELEMS" -ge "$PEERS" ] && break
    sleep 0.2
  done
  [ "$ELEMS" -ge "$PEERS" ] || { echo "node-a's inet weft holds $ELEMS of the $PEERS peer addresses after 60 s" >&2; exit 1; }
fi

iperf_servers

declare -A V U
iperf_reps
# shellcheck disable=SC2086
NONE=$(med ${V[pnone]}); POL=$(med ${V[ppol]})
RULES=$(ip netns exec "wl-ppol-n-node-a" nft list table inet weft | grep -cE '^\s+(ip|ip6|meta|tcp|udp|iifname|oifname|ct|jump|goto|log|icmp)')
echo "# kernel $(uname -r), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"
echo "east-west iperf3 (${T}s x ${REPS}, median): no policy ${NONE} Gbit/s; under $(grep -c '^kind' "$POLICIES") policies (${RULES} rules in inet weft) ${POL} Gbit/s; ratio $(pct "$POL" "$NONE") %"
if [ "$PEERS" -gt 0 ]; then
  # shellcheck disable=SC2086
  PP=$(med ${V[ppeers]})
  echo "east-west iperf3 (${T}s x ${REPS}, median): under a policy of ${ELEMS} set elements (peers of another node) ${PP} Gbit/s; ratio to no policy $(pct "$PP" "$NONE") %"
fi
if [ -n "$UDP" ]; then
  line="east-west iperf3 UDP (-b 0 -l 1400, ${T}s x ${REPS}, median received): no policy $(med ${U[pnone]}) Gbit/s; $(grep -c '^kind' "$POLICIES") policies $(med ${U[ppol]}) Gbit/s ($(pct "$(med ${U[ppol]})" "$(med ${U[pnone]})") %)"
  [ "$PEERS" -gt 0 ] && line+="; ${ELEMS} elements $(med ${U[ppeers]}) Gbit/s ($(pct "$(med ${U[ppeers]})" "$(med ${U[pnone]})") %)"
  echo "$line"
fi
for n in "${NAMES[@]}"; do echo "# $n runs: TCP [${V[$n]:-} ]${UDP:+ UDP [${U[$n]:-} ]}"; done
