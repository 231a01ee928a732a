#!/usr/bin/env bash
# policy-iperf.sh — iperf3 between two workloads on one weft NAT bridge (east-west, through the
# guard table, br_netfilter and the policy chains), with no policy and under a policy set.
#
# usage: bench/policy-iperf.sh [-t SECONDS] [-r REPS] [POLICY_MANIFEST]
#   POLICY_MANIFEST defaults to bench/confs/policies.yaml (200 policies); the script adds a
#   namespace policy that allows iperf3's port, so the measured flow passes the whole pipeline.
# Runs the real agent and CNI through `weft-operator lab --keep` (debug build from
# `cargo build --workspace`, or WEFT_BIN_DIR), then removes the labs.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 2; }
command -v iperf3 >/dev/null || { echo "missing iperf3 (apt-get install iperf3)" >&2; exit 2; }
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${WEFT_BIN_DIR:-$ROOT/target/debug}"
T=5; REPS=3
while [ $# -gt 0 ]; do
  case "$1" in
    -t) T="$2"; shift 2;; -r) REPS="$2"; shift 2;;
    *) break;;
  esac
done
POLICIES="$(cd "$(dirname "${1:-$HERE/confs/policies.yaml}")" && pwd)/$(basename "${1:-$HERE/confs/policies.yaml}")"
TMP="$(mktemp -d /tmp/weft-piperf.XXXXXX)"
LABS=()
cleanup() {
  for f in "${LABS[@]}"; do "$BIN/weft-operator" lab down "$f" --name "$(basename "$f" .yaml)" >/dev/null 2>&1 || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

lab() { # name, extra resource file or ""
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
      ingress: [{name: iperf, action: Allow, protocols: [{protocol: TCP, port: 5201}]}]
workloads:
  - {name: server, node: node-a, labels: {app: server}, networks: [bench]}
  - {name: client, node: node-a, labels: {app: client}, networks: [bench]}
YAML
  LABS+=("$f")
  "$BIN/weft-operator" lab "$f" --keep --name "$1" >/dev/null
}

measure() { # lab name -> median Gbit/s
  local s="wl-$1-w-server" c="wl-$1-w-client" ip
  ip=$(ip -n "$s" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
  ip netns exec "$s" iperf3 -s -D -1 >/dev/null 2>&1 || true
  local vals=()
  for _ in $(seq 1 "$REPS"); do
    ip netns exec "$s" iperf3 -s -D -1 >/dev/null 2>&1 || true
    sleep 0.3
    vals+=("$(ip netns exec "$c" iperf3 -c "$ip" -t "$T" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')")
  done
  printf '%s\n' "${vals[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}

lab pnone ""
lab ppol "$POLICIES"
NONE=$(measure pnone)
POL=$(measure ppol)
RULES=$(ip netns exec "wl-ppol-n-node-a" nft list table inet weft | grep -cE '^\s+(ip|ip6|meta|tcp|udp|iifname|oifname|ct|jump|goto|log|icmp)')
echo "east-west iperf3 (${T}s x ${REPS}, median): no policy ${NONE} Gbit/s; under $(grep -c '^kind' "$POLICIES") policies (${RULES} rules in inet weft) ${POL} Gbit/s; ratio $(python3 -c "print(round($POL/$NONE*100,1))") %"
