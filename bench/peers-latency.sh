#!/usr/bin/env bash
# peers-latency.sh — how long a workload another node publishes takes to reach this node's rules.
#
# usage: bench/peers-latency.sh [N]   (N publications, default 20)
#
# Builds nothing: run `cargo build --release -p weft-operator` first (or set WEFT_BIN_DIR).
# A throw-away "node" namespace runs a standalone weft agent with a shared peers directory and
# a policy whose group selects `app: peer` workloads of any node. Each round publishes one more
# workload of node "other" (its peers file replaced atomically, as that node's agent writes it)
# and times how long until the address is an element of this node's nftables sets, read every
# 2 ms or so (each `nft list sets` here costs a few ms, which bounds the resolution). Prints one
# line per round and the median. Everything is removed on exit.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${WEFT_BIN_DIR:-$ROOT/target/release}"
N="${1:-20}"
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 2; }
[ -x "$BIN/weft-operator" ] || { echo "$BIN/weft-operator missing: cargo build --release -p weft-operator" >&2; exit 2; }

# shellcheck source=lib/node.sh
. "$HERE/lib/node.sh"
node_up "wfp$$-" /tmp/weft-peers.XXXXXX
mkdir -p "$TMP/manifests" "$TMP/peers"
cat > "$TMP/manifests/bench.yaml" <<'YAML'
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: bench}
spec:
  mode: NAT
  subnets: [10.89.0.0/16]
  ipam: {nodeBlockPrefix: 24}
---
apiVersion: weft.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: from-peers, namespace: default}
spec:
  subject: {podSelector: {}}
  ingress:
    - {name: peers, action: Allow, from: [{pods: {podSelector: {matchLabels: {app: peer}}}}]}
YAML
WEFT_LOG=warn "$BIN/weft-operator" agent --peers-dir "$TMP/peers" --netns "/run/netns/$NODE_NS" \
  --node-name this --nodes this,other --manifests "$TMP/manifests" --state-dir "$TMP/state" \
  --socket "$TMP/agent.sock" --cni-bin-dir "$TMP/bin" --cni-conf-dir "$TMP/conf" \
  >"$TMP/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 1 200); do
  [ -f "$TMP/state/node.json" ] && break
  sleep 0.05
done
[ -f "$TMP/state/node.json" ] || { cat "$TMP/agent.log" >&2; echo "agent did not start" >&2; exit 1; }

ip netns exec "$NODE_NS" python3 - "$TMP/peers/other.json" "$N" <<'PY'
import json, os, statistics, subprocess, sys, time
path, n = sys.argv[1], int(sys.argv[2])
workloads, took = [], []
def sets():
    return subprocess.run(["nft", "list", "sets", "inet"], capture_output=True, text=True).stdout
for i in range(n):
    ip = "10.89.1.%d" % (10 + 2 * i)
    workloads.append({"network": "bench", "namespace": "default", "name": "peer%d" % i,
                      "labels": {"app": "peer"}, "ips": [ip], "active": True})
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"workloads": workloads}, f)
    t0 = time.monotonic()
    os.rename(tmp, path)
    while ip not in sets():
        if time.monotonic() - t0 > 10:
            sys.exit("%s never reached this node's sets" % ip)
        time.sleep(0.002)
    took.append((time.monotonic() - t0) * 1e3)
    print("publication %2d → rules: %7.1f ms" % (i + 1, took[-1]))
    time.sleep(0.1)
print("median %.1f ms, max %.1f ms over %d publications" % (statistics.median(took), max(took), n))
PY
