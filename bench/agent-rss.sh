#!/usr/bin/env bash
# agent-rss.sh [N] — resident memory of the weft agent holding N endpoints (default 1000).
# Starts a release agent in a throw-away node namespace with one NAT network, registers N
# endpoints over its socket exactly as the CNI does, and prints VmRSS before and after.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="${WEFT_BIN_DIR:-$HERE/../target/release}"
N="${1:-1000}"
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 2; }
NS="wfrss$$-node"; TMP="$(mktemp -d /tmp/weft-rss.XXXXXX)"; PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; ip netns del "$NS" 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
ip netns add "$NS"
mkdir -p "$TMP/m"
printf 'apiVersion: weft.dev/v1alpha1\nkind: Network\nmetadata: {name: bench}\nspec: {mode: NAT, subnets: [10.89.0.0/16], ipam: {nodeBlockPrefix: 16}}\n' > "$TMP/m/n.yaml"
WEFT_LOG=warn "$BIN/weft-operator" agent --netns "/run/netns/$NS" --node-name bench --manifests "$TMP/m" \
  --state-dir "$TMP/s" --socket "$TMP/a.sock" --cni-bin-dir "$TMP/b" --cni-conf-dir "$TMP/c" \
  --cni-binary "$BIN/weft" >"$TMP/log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do [ -f "$TMP/s/node.json" ] && break; sleep 0.05; done
rss() { awk '/VmRSS/ {print $2" "$3}' "/proc/$PID/status"; }
echo "agent RSS, 0 endpoints: $(rss)"
python3 - "$TMP/a.sock" "$N" <<'PY'
import json, socket, sys
path, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    s = socket.socket(socket.AF_UNIX); s.connect(path)
    ep = {"network": "bench", "containerId": f"c{i:05d}", "ifname": "eth0",
          "hostIfname": f"wf{i:011x}", "mac": "0a:58:0a:59:%02x:%02x" % (i >> 8, i & 255),
          "ips": [f"10.89.{i >> 8}.{i & 255}"], "podNamespace": "bench", "podName": f"pod-{i}"}
    s.sendall((json.dumps({"op": "register", "endpoint": ep}) + "\n").encode())
    reply = json.loads(s.makefile().readline())
    assert reply["ok"], reply
    s.close()
PY
echo "agent RSS, $N endpoints: $(rss)"
