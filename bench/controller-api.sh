#!/usr/bin/env bash
# controller-api.sh — the controller against a real kube-apiserver: K nodes × N Networks, then
# one Network added and one node added. For each step: the time until the controller's writes
# stop (the last write it issued, seen in the API server's own request counters) and how many
# writes it issued, by resource and verb; at the end the controller's RSS, and a check that
# every NodeNetwork holds a block of every Network and every Network is Valid and counts every node.
#
# usage: bench/controller-api.sh [NETWORKS] [NODES]        (default 1000 1000)
#
# Builds nothing: run `cargo build --release -p weft-operator` first (or set WEFT_BIN_DIR). The
# API server and kubectl come from e2e/cluster/build.sh (pinned Go modules, cached), etcd from
# Debian's etcd-server (bench/lib/apiserver.sh). Everything runs on 127.0.0.1 with ports of its
# own, its state under a temporary directory (etcd's on /dev/shm), and is removed on exit. No
# kubelet, no scheduler: Nodes are plain objects, which is all the controller reads of them.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${WEFT_BIN_DIR:-$ROOT/target/release}"
NETWORKS="${1:-1000}"
NODES="${2:-1000}"
[ -x "$BIN/weft-operator" ] || { echo "$BIN/weft-operator missing: cargo build --release -p weft-operator" >&2; exit 2; }

# shellcheck source=lib/apiserver.sh
. "$HERE/lib/apiserver.sh"
api_init ctl-api
CTL_METRICS=$((PORT_BASE + 3))
api_start
api_crds "$ROOT/crds/generated"
log "API server up on 127.0.0.1:$API; creating $NODES Nodes and $NETWORKS Networks"

# ---------------------------------------------------------------- objects
node_yaml() { # first count
  python3 - "$1" "$2" <<'PY'
import json, sys
first, count = int(sys.argv[1]), int(sys.argv[2])
items = [{"apiVersion": "v1", "kind": "Node",
          "metadata": {"name": f"node-{k}", "labels": {"kubernetes.io/hostname": f"node-{k}"}}}
         for k in range(first, first + count)]
print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
PY
}
network_yaml() { # first count
  python3 - "$1" "$2" <<'PY'
import json, sys
first, count = int(sys.argv[1]), int(sys.argv[2])
# One IPv6 /64 each (a thousand IPv4 subnets of a useful size do not fit in 10/8).
items = [{"apiVersion": "weft.dev/v1alpha1", "kind": "Network",
          "metadata": {"name": f"net-{i}"},
          "spec": {"mode": "NAT", "subnets": [f"fd00:{i // 65536:x}:{i % 65536:x}::/64"]}}
         for i in range(first, first + count)]
print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
PY
}
create_chunks() { # generator total
  local gen=$1 total=$2 step=250 i
  for ((i = 0; i < total; i += step)); do
    "$gen" "$i" $((total - i < step ? total - i : step)) | kc create -f - >/dev/null
  done
}
create_chunks node_yaml "$NODES"
create_chunks network_yaml "$NETWORKS"

# ---------------------------------------------------------------- measuring
# The API server's count of write requests (POST, PUT, PATCH, APPLY, DELETE) per resource and
# subresource, from its /metrics; the controller is the only writer once the objects exist.
writes() {
  local m
  for _ in 1 2 3 4 5; do
    m=$(kc get --raw /metrics --request-timeout=30s 2>/dev/null) && break
    sleep 1
  done
  [ -n "${m:-}" ] || { echo "cannot read the API server's metrics" >&2; return 1; }
  printf '%s\n' "$m" | python3 -c '
import re, sys, collections
c = collections.Counter()
for line in sys.stdin:
    if not line.startswith("apiserver_request_total{"):
        continue
    labels = dict(re.findall(r"(\w+)=\"([^\"]*)\"", line))
    if labels.get("verb") in ("POST", "PUT", "PATCH", "APPLY", "DELETE") and labels.get("group") == "weft.dev":
        key = labels["resource"] + ("/" + labels["subresource"] if labels.get("subresource") else "") + " " + labels["verb"]
        if not labels.get("code", "").startswith("2"):
            key += "(" + labels.get("code", "?") + ")"
        c[key] += int(float(line.rsplit(" ", 1)[1]))
for k, v in sorted(c.items()):
    print(k, v)
'
}
total() { awk '{s += $NF} END {print s + 0}' "$1"; }
# settle NAME START_NS [CHECK...]: waits until CHECK (a command) succeeds and the controller
# has issued no write for 10 s since (at most 30 min; a write that times out counts, and is
# retried), then prints how long after START its last write was seen and what it wrote.
settle() {
  local name=$1 start=$2 before="$TMP/writes.before" now last_change count prev=-1 done=
  shift 2
  cp "$TMP/writes.now" "$before"
  last_change=$(date +%s%N)
  while :; do
    sleep 0.5
    writes >"$TMP/writes.now"
    count=$(total "$TMP/writes.now")
    now=$(date +%s%N)
    if [ -z "$done" ] && { [ $# = 0 ] || "$@" >/dev/null 2>&1; }; then
      done=$now
      last_change=$now
    fi
    if [ "$count" != "$prev" ]; then
      prev=$count
      last_change=$now
    elif [ -n "$done" ] && ((now - last_change > 10 * 1000000000)); then
      break
    elif ((now - start > 1800 * 1000000000)); then
      echo "$name: still writing after 30 min" >&2
      break
    fi
  done
  python3 - "$name" "$start" "$last_change" "$before" "$TMP/writes.now" <<'PY'
import sys
name, start, last, before, after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
def read(p):
    d = {}
    for line in open(p):
        k, v = line.rsplit(" ", 1)
        d[k] = int(v)
    return d
b, a = read(before), read(after)
diff = {k: a[k] - b.get(k, 0) for k in a if a[k] - b.get(k, 0)}
print(f"{name}: done {(last - start) / 1e9:.1f} s after the change (the last write, or the check passing; ±0.5 s), "
      f"{sum(diff.values())} writes: " + ", ".join(f"{k} {v}" for k, v in sorted(diff.items())))
PY
}
writes >"$TMP/writes.now"

# Every node has its NodeNetwork and every Network's status counts every node.
start_done() {
  [ "$(kc get nodenetworks --no-headers | wc -l)" = "$NODES" ] &&
    [ "$(kc get networks -o jsonpath='{range .items[*]}{.status.nodes}{"\n"}{end}' | grep -cx "$NODES")" = "$NETWORKS" ]
}
log "starting the controller"
start=$(date +%s%N)
WEFT_LOG=warn "$BIN/weft-operator" controller --metrics-addr "127.0.0.1:$CTL_METRICS" \
  --lease-namespace weft-system --identity bench >"$TMP/controller.log" 2>&1 &
CTL=$!
PIDS+=("$CTL")
settle "start ($NETWORKS Networks x $NODES nodes)" "$start" start_done
rss() { awk '/VmRSS/ {printf "%.0f MiB", $2 / 1024}' "/proc/$CTL/status"; }
echo "controller RSS: $(rss)"

# The new Network's status counts every node; the new node's NodeNetwork has every Network.
network_done() {
  [ "$(kc get network "net-$NETWORKS" -o jsonpath='{.status.nodes}')" = "$NODES" ]
}
node_done() {
  kc get nodenetwork "node-$NODES" -o json |
    python3 -c 'import json, sys; sys.exit(len(json.load(sys.stdin)["spec"]["blocks"]) != int(sys.argv[1]))' $((NETWORKS + 1))
}
start=$(date +%s%N)
network_yaml "$NETWORKS" 1 | kc create -f - >/dev/null
settle "one Network added" "$start" network_done

start=$(date +%s%N)
node_yaml "$NODES" 1 | kc create -f - >/dev/null
settle "one node added" "$start" node_done
echo "controller RSS: $(rss)"

# ---------------------------------------------------------------- check
kc get nodenetworks -o json | python3 -c '
import json, sys
nets, nodes = int(sys.argv[1]), int(sys.argv[2])
items = json.load(sys.stdin)["items"]
short = [i["metadata"]["name"] for i in items
         if len({b["network"] for b in i["spec"].get("blocks", [])}) != nets]
print(f"check: {len(items)} NodeNetworks (want {nodes}); {len(short)} without a block of every Network")
sys.exit(0 if len(items) == nodes and not short else 1)
' $((NETWORKS + 1)) $((NODES + 1))
# No agent runs, so no Network is Ready (realized); each must be Valid and count every node.
kc get networks -o json | python3 -c '
import json, sys
nodes = int(sys.argv[1])
items = json.load(sys.stdin)["items"]
good = sum(1 for i in items
           if i.get("status", {}).get("nodes") == nodes
           and any(c["type"] == "Valid" and c["status"] == "True"
                   for c in i.get("status", {}).get("conditions", [])))
print(f"check: {good} of {len(items)} Networks Valid with blocks on all {nodes} nodes")
sys.exit(0 if good == len(items) else 1)
' $((NODES + 1))
if grep -qiE "error|panic" "$TMP/controller.log"; then
  echo "controller log:" >&2
  grep -iE "error|panic" "$TMP/controller.log" | head -5 >&2
fi
