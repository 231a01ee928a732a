#!/usr/bin/env bash
# peers-scale.sh — what ONE weft agent receives from a real kube-apiserver when ONE pod starts on
# another node, in a cluster of NODES nodes × PODS_PER_NODE pods faked by kwok.
#
# usage: bench/peers-scale.sh [NODES] [PODS_PER_NODE]        (default 1000 110)
#
# The cluster: etcd and the pinned API server on 127.0.0.1 (bench/lib/apiserver.sh), the CRDs of
# $WEFT_CRDS_DIR (default crds/generated), NODES Nodes kept Ready by kwok (bench/tools/kwok.sh,
# pinned, cached; built here when missing) and PODS_PER_NODE pods on each, which kwok runs; the
# release controller, one NAT Network (10.0.0.0/8, a /24 block per node) and one
# ClusterSegmentationPolicy whose peers are the pods labelled app=web. Every node but node-0
# gets the NodeNetwork status its agent would write: its PODS_PER_NODE workloads (network,
# namespace, name, five labels, address in its block, MAC), server-side applied by field manager
# weft-agent.
#
# node-0 runs the real agent ($WEFT_BIN_DIR/weft-operator agent --kube) in a network namespace
# of its own (weft-pscale-PID-LABEL), with an admin kubeconfig (no ServiceAccount: a benchmark)
# whose server is a byte-counting TCP relay to the API server. Measured: the time until the agent
# has written node-0's status Ready (its first lists can take a loaded API server seconds to
# answer), then the bytes it received until idle (at most the floor below for 5 s) and its RSS
# then; for a build whose CRDs define WorkloadSlices, first the time until its controller has
# published every workload in them; one idle minute ($WEFT_IDLE_SECONDS); five times, one pod
# started on node-7 (the Pod created and run by kwok, then its workload added to node-7's status
# as its agent would) and the bytes received until quiet for 3 s, less the idle rate, with the
# time until node-0's ruleset holds the pod's address (and how long the check's listing of that
# ruleset took); the controller's WorkloadSlice reconciles and the agent's reconciles during
# those five rounds (count, mean and spread, from their metrics); the RSS of the agent. At the
# end: the RSS of the API server and the API server's own watch event sizes (all watchers
# together). Figures are printed and appended to $TMP/results, printed again at the end.
#
# Two builds in one cluster: with $WEFT_BASELINE_BIN_DIR (and $WEFT_BASELINE_CRDS_DIR, default
# $WEFT_CRDS_DIR), that build's controller and agent are measured first, then stopped, and the
# build of $WEFT_BIN_DIR (its CRDs applied over the baseline's) is measured on the same nodes
# and pods, with pods of its own for its five rounds. The cluster is most of a run's time.
#
# "Quiet" allows a floor of $WEFT_IDLE_FLOOR bytes a second (default 2048): an agent that
# polls an API that is not installed (KubeVirt's) never goes without a byte for 5 s. Set it to
# 0 for the strict reading.
#
# When the API server does not cope with every pod (its RSS past $WEFT_APISERVER_MAX_MIB, default
# 16384, or creating them past $WEFT_PODS_MAX_SECONDS, default 2400), the pods stop there and the
# output says so; the NodeNetwork statuses still hold PODS_PER_NODE workloads each. When kwok
# cannot be built or run, the Nodes stay plain objects and the pods Pending, and the output says so.
#
# Builds nothing of weft: run `cargo build --release -p weft-operator -p weft-cni` first (or set
# WEFT_BIN_DIR). Needs root (network namespace, nftables), Go (kwok), etcd. Everything it starts
# or creates is removed on exit.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${WEFT_BIN_DIR:-$ROOT/target/release}"
CRDS="${WEFT_CRDS_DIR:-$ROOT/crds/generated}"
NODES="${1:-1000}"
PER="${2:-110}"
APISERVER_MAX_MIB="${WEFT_APISERVER_MAX_MIB:-16384}"
PODS_MAX_SECONDS="${WEFT_PODS_MAX_SECONDS:-2400}"
[ "$(id -u)" = 0 ] || { echo "must run as root (network namespace, nftables)" >&2; exit 2; }
[ -x "$BIN/weft-operator" ] || { echo "$BIN/weft-operator missing: cargo build --release -p weft-operator" >&2; exit 2; }
[ -x "$BIN/weft" ] || { echo "$BIN/weft missing: cargo build --release -p weft-cni" >&2; exit 2; }
command -v nft >/dev/null || { echo "nft missing: apt-get install nftables" >&2; exit 2; }
((NODES >= 8)) || { echo "NODES must be at least 8 (a pod starts on node-7)" >&2; exit 2; }
((PER >= 1 && PER <= 240)) || { echo "PODS_PER_NODE must be 1 to 240 (a /24 block per node)" >&2; exit 2; }
OTHER=node-7

# shellcheck source=lib/apiserver.sh
. "$HERE/lib/apiserver.sh"
api_init peers-scale
NETNS="weft-pscale-$$"
NETNSES=()
PROXY=$((PORT_BASE + 3)) CTL_METRICS=$((PORT_BASE + 4)) AGENT_METRICS=$((PORT_BASE + 5))
IDLE_FLOOR="${WEFT_IDLE_FLOOR:-2048}"
# The network namespace goes first: a process still in it keeps it until that process exits.
# $WEFT_BENCH_LOGS (a directory), when set, gets the logs and results of the run.
bench_cleanup() {
  [ -n "${CHILD:-}" ] && kill "$CHILD" 2>/dev/null
  local ns
  for ns in "${NETNSES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  if [ -n "${WEFT_BENCH_LOGS:-}" ]; then
    mkdir -p "$WEFT_BENCH_LOGS" && cp "$TMP"/*.log "$TMP/results" "$WEFT_BENCH_LOGS/" 2>/dev/null
  fi
}
# py ARGS...: bench/lib/peers_scale.py in the background, waited for (so that a signal to this
# script is handled at once); its output goes to $TMP/py.out, which `out` sets OUT to.
CHILD=""
py() {
  python3 "$HERE/lib/peers_scale.py" "$@" >"$TMP/py.out" &
  CHILD=$!
  wait "$CHILD"
  CHILD=""
}
out() { OUT=$(cat "$TMP/py.out"); }
API_ARGS=(--api "$API" --certs "$TMP" --per "$PER")
result() { printf '%s\n' "$*" | tee -a "$TMP/results"; }
loud() { # a line that says the run is not what was asked
  local line="!!!!!!!! $*"
  printf '%s\n' "$line" >&2
  printf '%s\n' "$line" >>"$TMP/results"
}
mib() { echo "$(rss_mib "$1") MiB"; }
# metrics NAME NETNS: saves the controller's and the agent's metrics now (the agent's from its
# network namespace NETNS) as $TMP/metrics-NAME-{ctl,agent}.
metrics() {
  curl -s "http://127.0.0.1:$CTL_METRICS/metrics" >"$TMP/metrics-$1-ctl" || true
  ip netns exec "$2" curl -s "http://127.0.0.1:$AGENT_METRICS/metrics" >"$TMP/metrics-$1-agent" || true
}
# reconciles FROM TO WHO HISTOGRAM: the reconciles of histogram HISTOGRAM (with its labels, as
# the metrics print it) between the metrics saved as FROM (or none) and as TO, of WHO (ctl or
# agent): how many, their mean time and how many ended within each bucket's bound.
reconciles() {
  python3 - "${1:+$TMP/metrics-$1-$3}" "$TMP/metrics-$2-$3" "$4" <<'PY'
import re, sys
def read(path, name):
    name, labels = (name.split("{", 1) + [""])[:2]
    labels = labels.rstrip("}")
    out = {}
    if not path:
        return out
    for line in open(path):
        m = re.match(re.escape(name) + r"_(sum|count|bucket)\{?([^}]*)\}? (\S+)$", line.strip())
        if not m or not all(pair in m.group(2).split(",") for pair in labels.split(",") if pair):
            continue
        le = re.search(r'le="([^"]+)"', m.group(2))
        out[m.group(1) + (":" + le.group(1) if le else "")] = float(m.group(3))
    return out
a, b = read(sys.argv[1], sys.argv[3]), read(sys.argv[2], sys.argv[3])
d = {k: b[k] - a.get(k, 0) for k in b}
n = int(d.get("count", 0))
if n == 0:
    print("none reported")
    sys.exit()
buckets = sorted((float(k.split(":")[1]), int(v)) for k, v in d.items()
                 if k.startswith("bucket:") and k != "bucket:+Inf")
within, last = [], 0
for bound, c in buckets:
    if c > last:
        within.append(f"{c - last} within {bound * 1e3:g} ms")
    last = c
if n > last:
    within.append(f"{n - last} longer")
print(f"{n}, {1e3 * d['sum'] / n:.1f} ms on average ({', '.join(within)})")
PY
}
peak_mib() { awk '/^VmHWM/ {printf "%.0f MiB", $2 / 1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
json_field() { python3 -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

result "peers-scale: $NODES nodes x $PER pods; weft-operator $(sha256sum "$BIN/weft-operator" | cut -c1-12) from $BIN; CRDs $CRDS"
busiest() { top -bn1 -o %CPU | awk 'NR > 7 && NR <= 11 {printf "%s %s%%, ", $12, $9}' | sed 's/, $//'; }
result "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo); load average at start $(cut -d' ' -f1-3 /proc/loadavg); busiest processes: $(busiest)"

# ---------------------------------------------------------------- kwok
KWOK=""
if KWOK_DIR=$("$HERE/tools/kwok.sh" 2> >(tee "$TMP/kwok-build.log" >&2) | tail -1) && [ -x "$KWOK_DIR/kwok" ]; then
  KWOK="$KWOK_DIR/kwok"
else
  loud "kwok could not be built (see above): the Nodes are plain objects and the pods stay Pending"
fi

# ---------------------------------------------------------------- the API server and the nodes
api_start
api_crds "${WEFT_BASELINE_CRDS_DIR:-$CRDS}"
log "API server up on 127.0.0.1:$API (RSS $(mib "$API_PID")); creating $NODES Nodes"
py nodes "${API_ARGS[@]}" --nodes "$NODES" --threads 8
cat "$TMP/py.out" >&2
kc create namespace bench >/dev/null
kc create serviceaccount default -n bench >/dev/null  # no controller-manager makes it

ready_nodes() { kc get nodes --no-headers 2>/dev/null | awk '$2 == "Ready"' | wc -l; }
if [ -n "$KWOK" ]; then
  "$KWOK" --kubeconfig "$KUBECONFIG" -c "$KWOK_DIR/stages.yaml" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --node-lease-duration-seconds=40 --cidr=100.64.0.0/10 >"$TMP/kwok.log" 2>&1 &
  KWOK_PID=$!
  PIDS+=("$KWOK_PID")
  start=$SECONDS
  while (($(ready_nodes) < NODES)); do
    if ! kill -0 "$KWOK_PID" 2>/dev/null || ((SECONDS - start > 600)); then
      tail -20 "$TMP/kwok.log" >&2
      loud "kwok did not make the $NODES Nodes Ready ($(ready_nodes) are): the Nodes are plain objects and the pods stay Pending"
      kill "$KWOK_PID" 2>/dev/null || true
      KWOK=""
      break
    fi
    sleep 2
  done
  [ -n "$KWOK" ] && result "kwok $("$KWOK" --version | awk '{print $3}'): $NODES Nodes Ready in $((SECONDS - start)) s"
fi

# ---------------------------------------------------------------- pods
# Ten pods per node at a time; stop early when the API server does not cope.
not_running() { kc get pods -n bench --field-selector=status.phase!=Running -o name --chunk-size=2000 2>/dev/null | wc -l; }
start=$SECONDS
created=0
for ((j = 0; j < PER; j += 10)); do
  stop=$((j + 10 > PER ? PER : j + 10))
  py pods "${API_ARGS[@]}" --nodes "$NODES" --start "$j" --stop "$stop" --threads 8
  out
  created=$((created + $(json_field "$OUT" pods)))
  log "$created pods created ($((SECONDS - start)) s); API server RSS $(mib "$API_PID")"
  if (($(rss_mib "$API_PID") > APISERVER_MAX_MIB)) || ((SECONDS - start > PODS_MAX_SECONDS)); then
    ((stop < PER)) && loud "the API server does not cope with $((NODES * PER)) pods here: stopped at $created (RSS $(mib "$API_PID") past $APISERVER_MAX_MIB MiB, or more than $PODS_MAX_SECONDS s)"
    break
  fi
done
result "pods: $created created in $((SECONDS - start)) s ($(awk -v n="$created" -v s=$((SECONDS - start)) 'BEGIN {printf "%.0f", n / (s ? s : 1)}')/s); API server RSS $(mib "$API_PID")"
if [ -n "$KWOK" ]; then
  start=$SECONDS
  while left=$(not_running) && ((left > 0)); do
    ((SECONDS - start > 1200)) && { tail -5 "$TMP/kwok.log" >&2; echo "$left pods still not Running after 20 min" >&2; exit 1; }
    log "$left pods not Running yet"
    sleep 10
  done
  result "pods: all $created Running $((SECONDS - start)) s later; API server RSS $(mib "$API_PID"), kwok RSS $(mib "$KWOK_PID")"
fi

# ---------------------------------------------------------------- weft, once per build
# measure LABEL BIN CRDS FIRST_ROUND: that build's controller (the same Lease identity, so it
# takes over at once) and node-0's agent behind a counting relay of its own; rounds FIRST_ROUND
# to FIRST_ROUND + 4 (pods of their own); the controller and the agent stopped at the end.
published=""
measure() {
  local label=$1 bin=$2 crds=$3 first=$4 ns="$NETNS-$1" count="$TMP/count-$1"
  result "---- $label: weft-operator $(sha256sum "$bin/weft-operator" | cut -c1-12) from $bin; CRDs $crds"
  api_crds "$crds"
  WEFT_LOG=warn "$bin/weft-operator" controller --metrics-addr "127.0.0.1:$CTL_METRICS" \
    --lease-namespace weft-system --identity bench >"$TMP/controller-$label.log" 2>&1 &
  CTL_PID=$!
  PIDS+=("$CTL_PID")
  kc apply -f - >/dev/null <<'YAML'
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: pods}
spec:
  mode: NAT
  subnets: [10.0.0.0/8]
  ipam: {nodeBlockPrefix: 24}
---
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: web-to-all}
spec:
  tier: Admin
  priority: 100
  subject: {pods: {podSelector: {}}}
  ingress:
    - name: from-web
      action: Accept
      from: [{pods: {podSelector: {matchLabels: {app: web}}}}]
YAML
  local start=$SECONDS
  while (($(with_block) < NODES)); do
    ((SECONDS - start > 900)) && { tail -5 "$TMP/controller-$label.log" >&2; echo "not every NodeNetwork has its block after 15 min" >&2; exit 1; }
    sleep 2
  done
  result "controller: every NodeNetwork has its block of pods $((SECONDS - start)) s after it started"

  # The other nodes' agents, once: what each would write.
  if [ -z "$published" ]; then
    py publish "${API_ARGS[@]}" --nodes "$NODES" --first 1 --threads 8
    out
    result "NodeNetwork statuses of node-1 … node-$((NODES - 1)) ($PER workloads each) applied in $(json_field "$OUT" seconds) s; $OTHER's object is $(kc get --raw "/apis/weft.dev/v1alpha1/nodenetworks/$OTHER" | wc -c) bytes of JSON as the API server sends it"
    published=1
  fi
  # A build that publishes peers in WorkloadSlices: until its controller has written them all.
  if grep -qs '^ *kind: WorkloadSlice$' "$crds"/*; then
    start=$SECONDS
    # The controller takes a workload only for a pod bound to its node: those created.
    local made=$((created / NODES < PER ? created / NODES : PER))
    local want=$(((NODES - 1) * made + first - 1)) got=0
    while got=$(in_slices) && ((got < want)); do
      ((SECONDS - start > 900)) && { tail -5 "$TMP/controller-$label.log" >&2; echo "the WorkloadSlices hold $got of $want workloads after 15 min" >&2; exit 1; }
      sleep 2
    done
    result "controller: the WorkloadSlices of pods hold all $got published workloads $((SECONDS - start)) s later, in $(kc get workloadslices -o name | wc -l) slices of $(kc get workloadslices -o json | wc -c) bytes of JSON in all"
  fi
  sleep 5 # the controller sums them into the Network's status

  # node-0's agent behind the counting relay
  ip netns add "$ns"
  NETNSES+=("$ns")
  ip -n "$ns" link set lo up
  python3 "$HERE/lib/peers_scale.py" proxy --netns "/run/netns/$ns" --listen "$PROXY" --upstream "$API" --out "$count" &
  local proxy_pid=$!
  PIDS+=("$proxy_pid")
  for _ in $(seq 1 50); do [ -s "$count" ] && break; sleep 0.1; done
  [ -s "$count" ] || { echo "the counting relay did not start" >&2; exit 1; }
  sed "s#https://127.0.0.1:$API\$#https://127.0.0.1:$PROXY#" "$TMP/admin.kubeconfig" >"$TMP/agent.kubeconfig"
  grep -q "127.0.0.1:$PROXY" "$TMP/agent.kubeconfig" || { echo "cannot point the agent's kubeconfig at the relay" >&2; exit 1; }
  local dir="$TMP/agent-$label"
  mkdir -p "$dir/cni/bin" "$dir/cni/net.d"
  # An agent measured before left node-0's status Ready: this one must write it again.
  kc patch nodenetwork node-0 --subresource=status --type=merge -p '{"status": {"conditions": null, "networks": null}}' >/dev/null
  log "$label: starting node-0's agent"
  start=$SECONDS
  KUBECONFIG=$TMP/agent.kubeconfig WEFT_LOG=info "$bin/weft-operator" agent --kube \
    --netns "/run/netns/$ns" --node-name node-0 --state-dir "$dir/state" \
    --socket "$dir/agent.sock" --cni-bin-dir "$dir/cni/bin" --cni-conf-dir "$dir/cni/net.d" \
    --cni-binary "$bin/weft" --metrics-addr "127.0.0.1:$AGENT_METRICS" >"$TMP/agent-$label.log" 2>&1 &
  AGENT_PID=$!
  PIDS+=("$AGENT_PID")
  # Ready first (its first lists can take the API server seconds to answer), then quiet.
  local status=""
  while status=$(kc get nodenetwork node-0 -o jsonpath='{.status.networks} {.status.conditions[?(@.type=="Ready")].status} {.status.observedGeneration}') &&
    [[ "$status" != '["pods"] True '* ]]; do
    kill -0 "$AGENT_PID" 2>/dev/null || { tail -20 "$TMP/agent-$label.log" >&2; echo "the agent exited" >&2; exit 1; }
    ((SECONDS - start > 900)) && { tail -20 "$TMP/agent-$label.log" >&2; echo "node-0's agent is not Ready after 15 min (status: $status)" >&2; exit 1; }
    sleep 0.5
  done
  local ready=$((SECONDS - start))
  py quiet --out "$count" --quiet 5 --floor "$IDLE_FLOOR" --first --limit 1800
  out
  result "agent start: Ready after ${ready} s; $(json_field "$OUT" bytes) bytes received until idle (at most $IDLE_FLOOR bytes/s for 5 s); RSS then $(mib "$AGENT_PID") (peak $(peak_mib "$AGENT_PID"))"
  # A peer labelled app=web on another node: pod J of node I has app APPS[(I * PER + J) % 10].
  local peer_ip="" peer_node i
  for ((i = 1; i < NODES && i <= 10; i++)); do
    peer_node=node-$i
    peer_ip=$(kc get nodenetwork "$peer_node" -o json | python3 -c '
import json, sys
ws = json.load(sys.stdin)["status"]["workloads"]
print(next((w["ips"][0] for w in ws if w["labels"]["app"] == "web"), ""))')
    [ -n "$peer_ip" ] && break
  done
  ip netns exec "$ns" nft list ruleset >"$TMP/ruleset-$label"
  if grep -qwF "$peer_ip" "$TMP/ruleset-$label"; then
    result "agent: Ready; $peer_node's web pod $peer_ip is in node-0's ruleset"
  else
    loud "agent: Ready; $peer_node's web pod ${peer_ip:-(none found)} is NOT in node-0's ruleset (no set of peers?)"
  fi

  # idle, then one pod at a time on node-7
  py idle --out "$count" --seconds "${WEFT_IDLE_SECONDS:-60}"
  out
  local idle_bytes idle_seconds
  idle_bytes=$(json_field "$OUT" bytes) idle_seconds=$(json_field "$OUT" seconds)
  result "idle minute: $idle_bytes bytes received in $idle_seconds s"
  local wait_flag=()
  [ -n "$KWOK" ] && wait_flag=(--wait-running)
  metrics "$label-pods" "$ns"
  for ((r = first; r < first + 5; r++)); do
    py round "${API_ARGS[@]}" --out "$count" --node "$OTHER" --index "$r" --quiet 3 --floor "$IDLE_FLOOR" --netns "$ns" "${wait_flag[@]}"
    out
    python3 - "$OUT" "$idle_bytes" "$idle_seconds" "$r" "$OTHER" <<'PY' | tee -a "$TMP/results"
import json, sys
o, idle_b, idle_s, r, node = json.loads(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
net = o["bytes"] - idle_b / idle_s * o["seconds"]
rules = "never seen" if o["in_rules_seconds"] is None else f"{o['in_rules_seconds'] * 1e3:.0f} ms"
if o.get("listing_seconds") is not None:
    rules += f" (the check lists the ruleset again and again: one listing took up to {o['listing_seconds'] * 1e3:.0f} ms)"
print(f"pod {r} on {node} ({o['ip']}): {o['bytes']} bytes received from its status write until "
      f"quiet ({o['seconds']} s; above the floor until {o['active']} s), {net:.0f} less the idle rate; "
      f"in node-0's ruleset after {rules}; before, while the Pod was created and run by kwok "
      f"({o['pod_running_seconds']} s): {o['bytes_while_pod_started']} bytes")
PY
  done
  metrics "$label-end" "$ns"
  local slices='weft_controller_reconcile_duration_seconds{kind="WorkloadSlice"}'
  result "controller's WorkloadSlice reconciles before the pods: $(reconciles "" "$label-pods" ctl "$slices")"
  result "controller's WorkloadSlice reconciles of the five pods: $(reconciles "$label-pods" "$label-end" ctl "$slices")"
  result "agent's reconciles of the five pods: $(reconciles "$label-pods" "$label-end" agent weft_agent_reconcile_duration_seconds)"
  result "agent RSS at the end: $(mib "$AGENT_PID") (peak $(peak_mib "$AGENT_PID")); total received $(cut -d' ' -f1 "$count") bytes, sent $(cut -d' ' -f2 "$count") bytes over $(cut -d' ' -f3 "$count") connection(s); controller RSS $(mib "$CTL_PID")"
  if grep -qE " (ERROR|WARN) " "$TMP/agent-$label.log"; then
    echo "$label agent log (warnings and errors):" >&2
    grep -E " (ERROR|WARN) " "$TMP/agent-$label.log" | head -10 >&2
  fi
  local p
  for p in "$AGENT_PID" "$CTL_PID" "$proxy_pid"; do kill "$p" 2>/dev/null || true; done
  for p in "$AGENT_PID" "$CTL_PID" "$proxy_pid"; do
    for _ in $(seq 1 20); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$p" 2>/dev/null || true
  done
  ip netns del "$ns" 2>/dev/null || true
}
with_block() {
  kc get nodenetworks -o json | python3 -c '
import json, sys
print(sum(1 for i in json.load(sys.stdin)["items"]
          if any(b.get("network") == "pods" and b.get("ipv4") for b in i.get("spec", {}).get("blocks", []))))'
}
in_slices() {
  kc get workloadslices -l weft.dev/network=pods -o json | python3 -c '
import json, sys
print(sum(len(i["spec"].get("workloads", [])) for i in json.load(sys.stdin)["items"]))'
}
if [ -n "${WEFT_BASELINE_BIN_DIR:-}" ]; then
  measure baseline "$WEFT_BASELINE_BIN_DIR" "${WEFT_BASELINE_CRDS_DIR:-$CRDS}" 1
  measure weft "$BIN" "$CRDS" 6
else
  measure weft "$BIN" "$CRDS" 1
fi

# ---------------------------------------------------------------- the end
result "---- the end"
result "API server RSS $(mib "$API_PID") (peak $(peak_mib "$API_PID")); etcd RSS $(mib "$ETCD_PID"), data $(du -sm "$ETCD_DIR" | cut -f1) MiB${KWOK:+; kwok RSS $(mib "$KWOK_PID")}"
result "load average at the end $(cut -d' ' -f1-3 /proc/loadavg); busiest processes now: $(busiest)"
result "API server's apiserver_watch_events_sizes (every watcher of the whole run: kwok, the controllers, the agents), by resource:"
kc get --raw /metrics | python3 "$HERE/lib/peers_scale.py" watchsizes | tee -a "$TMP/results"
echo
echo "==== results"
cat "$TMP/results"
