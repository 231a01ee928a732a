#!/usr/bin/env bash
# cni-bench-weft.sh — the same ADD/DEL harness as cni-bench.sh, for weft.
#
# usage: bench/cni-bench-weft.sh [cni-bench options: -n N -c C --runs R --modes seq,conc --json F]
#
# Builds nothing: run `cargo build --release -p weft-operator` and `cni-plugin/static.sh` first
# (the plugin static, as weft ships it), or set WEFT_BIN_DIR to a directory holding both `weft`
# and `weft-operator`, or WEFT_CNI to the plugin binary to measure.
# A throw-away "node" namespace gets a running weft agent (from a manifests dir holding one NAT
# Network, 10.89.0.0/16 with a /16 node block), whose conflist is then driven by lib/cni_bench.py
# inside that namespace exactly like the reference plugins (WEFT_BENCH_MANIFEST=FILE adds a
# manifest, e.g. bench/confs/policies.yaml, to measure ADD under a policy set; WEFT_BENCH_PEERS=N
# adds N workloads of another node that a policy's group holds: N set elements; WEFT_BENCH_TAP=1
# wires each pod as a VM, with a tap; WEFT_BENCH_LIMITS='{conntrackEntries: 1000, ...}' gives the
# Network those `spec.limits`, and reports whether they were seen in force: pod addresses in
# weft's limit class sets and shaping links): a fresh `ip netns add` per pod, ADDs
# then DELs, sequential and concurrent, with leak checks. Everything is removed on exit.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${WEFT_BIN_DIR:-$ROOT/target/release}"
if [ -n "${WEFT_BIN_DIR:-}" ]; then PLUGIN_DEFAULT=$BIN/weft; else PLUGIN_DEFAULT=$ROOT/target/$(uname -m)-unknown-linux-musl/plugin/weft; fi
PLUGIN="${WEFT_CNI:-$PLUGIN_DEFAULT}"
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 2; }
[ -x "$BIN/weft-operator" ] || { echo "$BIN/weft-operator missing: cargo build --release -p weft-operator" >&2; exit 2; }
[ -x "$PLUGIN" ] || { echo "$PLUGIN missing: cni-plugin/static.sh" >&2; exit 2; }

# shellcheck source=lib/node.sh
. "$HERE/lib/node.sh"
node_up "wfb$$-" /tmp/weft-bench.XXXXXX
mkdir -p "$TMP/manifests"
cat > "$TMP/manifests/bench.yaml" <<'YAML'
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: bench}
spec:
  mode: NAT
  subnets: [10.89.0.0/16]
  ipam: {nodeBlockPrefix: 16}
YAML
if [ -n "${WEFT_BENCH_LIMITS:-}" ]; then echo "  limits: $WEFT_BENCH_LIMITS" >> "$TMP/manifests/bench.yaml"; fi
if [ -n "${WEFT_BENCH_MANIFEST:-}" ]; then cp "$WEFT_BENCH_MANIFEST" "$TMP/manifests/extra.yaml"; fi
# WEFT_BENCH_PEERS=N: N workloads on another node (a peers file, as their agent would publish
# them) and a policy whose groups hold them all: N policy set elements on this node.
PEERS_ARGS=()
if [ -n "${WEFT_BENCH_PEERS:-}" ]; then
  mkdir -p "$TMP/peers"
  python3 "$HERE/lib/peers.py" "$WEFT_BENCH_PEERS" "$TMP/peers/other.json"
  cat >> "$TMP/manifests/bench.yaml" <<'YAML'
---
apiVersion: weft.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: from-peers, namespace: default}
spec:
  subject: {podSelector: {}}
  ingress:
    - {name: peers, action: Allow, from: [{pods: {podSelector: {matchLabels: {app: peer}}}}]}
    - {name: rest, action: Allow}
YAML
  PEERS_ARGS=(--peers-dir "$TMP/peers")
fi
METRICS_PORT=$((20000 + $$ % 20000))
WEFT_LOG=warn,weft_operator::agent::mirror=info "$BIN/weft-operator" agent "${PEERS_ARGS[@]}" --metrics-addr "127.0.0.1:$METRICS_PORT" --netns "/run/netns/$NODE_NS" --node-name bench \
  --manifests "$TMP/manifests" --state-dir "$TMP/state" --socket "$TMP/agent.sock" \
  --cni-bin-dir "$TMP/bin" --cni-conf-dir "$TMP/conf" --cni-binary "$PLUGIN" \
  >"$TMP/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 1 200); do
  [ -f "$TMP/conf/10-weft.conflist" ] && [ -f "$TMP/state/node.json" ] && break
  sleep 0.05
done
[ -f "$TMP/conf/10-weft.conflist" ] || { cat "$TMP/agent.log" >&2; echo "agent did not start" >&2; exit 1; }
python3 - "$TMP/conf/10-weft.conflist" "$TMP/bench.conflist" <<'PY'
import json, os, sys
c = json.load(open(sys.argv[1]))
c["plugins"][0]["network"] = "bench"
c["name"] = "weft-bench"
if os.environ.get("WEFT_BENCH_TAP"):
    # A VM's attachment: the veth end joined by tc redirects to a tap named for the VMM.
    c["plugins"][0]["attachment"] = "tap"
json.dump(c, open(sys.argv[2], "w"))
PY
echo "weft agent up in $NODE_NS; plugin $PLUGIN, $(stat -c %s "$PLUGIN") bytes, $(file -b "$PLUGIN" | grep -oE 'static-pie linked|statically linked|dynamically linked')" >&2
# A VM's pod namespace holds the tap, not the address (the guest has it): no address check.
VERIFY=()
if [ -n "${WEFT_BENCH_TAP:-}" ]; then VERIFY=(--no-verify); fi
# WEFT_BENCH_LIMITS: were the limits in force? Every 0.2 s until each was seen (then it stops,
# to cost the measured runs nothing more): pod addresses in the limit class sets (`lim_*`),
# with an egress bandwidth limit shaping links (ifb) in use (with `egressBandwidthMode: Police`
# instead: host ports in the guard table's meter classes, `bw_*`), with an ingress one `tbf`s at
# the root of pods' host ports; what each was when first seen is printed at the end.
SAMPLER=""
if [ -n "${WEFT_BENCH_LIMITS:-}" ]; then
  echo "0 0 0 0" > "$TMP/limits-seen"
  # What to look for: set elements only with a connection limit, shaping links only with an
  # egress bandwidth limit shaped, meter classes only with one policed, port tbfs only with an
  # ingress one. Each is looked for only until seen, so that the sampler's processes (which
  # share the two CPUs with the ADDs of the run's start) cost no variant more than it needs.
  want_e=0; want_i=0; want_t=0; want_p=0
  [[ "$WEFT_BENCH_LIMITS" == *onn* ]] && want_e=1
  if [[ "$WEFT_BENCH_LIMITS" == *egressBandwidth* ]]; then
    if [[ "$WEFT_BENCH_LIMITS" == *Police* ]]; then want_p=1; else want_i=1; fi
  fi
  [[ "$WEFT_BENCH_LIMITS" == *ingressBandwidth* ]] && want_t=1
  (
    set +e +o pipefail
    me=0; mi=0; mt=0; mp=0
    while [ -d "$TMP" ] && sleep 0.2; do
      if [ "$want_e" = 1 ] && [ "$me" = 0 ]; then
        for s in $(ip netns exec "$NODE_NS" nft list sets inet 2>/dev/null | sed -nE 's/^\s*set (lim_[a-z0-9_]+) \{.*/\1/p'); do
          me=$((me + $(ip netns exec "$NODE_NS" nft list set inet weft "$s" 2>/dev/null | grep -oE '10\.89\.[0-9]+\.[0-9]+' | wc -l)))
        done
      fi
      if [ "$want_i" = 1 ] && [ "$mi" = 0 ]; then
        mi=$(ip -n "$NODE_NS" -o link show type ifb 2>/dev/null | grep -c 'alias weft:shape:')
      fi
      if [ "$want_t" = 1 ] && [ "$mt" = 0 ]; then
        mt=$(tc -n "$NODE_NS" qdisc show 2>/dev/null | grep -cE '^qdisc tbf [0-9a-f]+: dev wf[0-9a-f]+ root')
      fi
      if [ "$want_p" = 1 ] && [ "$mp" = 0 ]; then
        for s in $(ip netns exec "$NODE_NS" nft list sets bridge 2>/dev/null | sed -nE 's/^\s*set (bw_[0-9_]+) \{.*/\1/p'); do
          mp=$((mp + $(ip netns exec "$NODE_NS" nft list set bridge weft "$s" 2>/dev/null | grep -oE '"wf[0-9a-f]+"' | wc -l)))
        done
      fi
      echo "$me $mi $mt $mp" > "$TMP/limits-seen"
      if { [ "$want_e" = 0 ] || [ "$me" -gt 0 ]; } && { [ "$want_i" = 0 ] || [ "$mi" -gt 0 ]; } &&
         { [ "$want_t" = 0 ] || [ "$mt" -gt 0 ]; } && { [ "$want_p" = 0 ] || [ "$mp" -gt 0 ]; }; then
        break
      fi
    done
  ) &
  SAMPLER=$!
fi
# The plugin's node locations come from the runtime's environment (never the conflist).
# Its exit status (1: a leak or a failed operation) is the script's, after the reports below.
RC=0
WEFT_STATE_DIR="$TMP/state" WEFT_AGENT_SOCKET="$TMP/agent.sock" \
  ip netns exec "$NODE_NS" python3 "$HERE/lib/cni_bench.py" --prefix "${PREFIX}p" \
  --ipam-dir "$TMP/ipam" --cni-path "$TMP/bin" "${VERIFY[@]}" "$@" "$TMP/bench.conflist" || RC=$?
if [ -n "$SAMPLER" ]; then
  kill "$SAMPLER" 2>/dev/null || true; wait "$SAMPLER" 2>/dev/null || true
  read -r me mi mt mp < "$TMP/limits-seen"
  echo "limits ($WEFT_BENCH_LIMITS): in force: $me pod addresses in the limit class sets, $mi shaping links (ifb) in use, $mt host ports with a tbf and $mp host ports in egress meter classes when first seen (0: never, or not looked for)"
  # Every pod's port, not only the first: how many ports the agent shaped while their pod
  # was there (a port whose pod went before its shaping was never shaped), against the ADDs.
  if [[ "$WEFT_BENCH_LIMITS" == *Bandwidth* ]]; then
    # (None with every egress limit policed and no ingress limit: nothing shaped.)
    SHAPED=$({ grep 'bandwidth shaping changed' "$TMP/agent.log" || true; } | { grep 'Some(' || true; } | { grep -o 'port=[^ ]*' || true; } | sort -u | wc -l)
  fi
fi
# Where the time went on the agent's side: its reconciles (nearly all of them registrations
# here) and the ADD/DEL durations the weft binary reported, as means.
ip netns exec "$NODE_NS" python3 - "http://127.0.0.1:$METRICS_PORT/metrics" "${SHAPED:-}" <<'PY' || true
import re, sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
def mean(prefix, labels=""):
    s = re.search(r"^%s_sum%s (\S+)" % (prefix, re.escape(labels)), text, re.M)
    c = re.search(r"^%s_count%s (\S+)" % (prefix, re.escape(labels)), text, re.M)
    if not s or not c or float(c.group(1)) == 0:
        return "n/a"
    return "%.2f ms over %d" % (1e3 * float(s.group(1)) / float(c.group(1)), float(c.group(1)))
print("agent: reconcile mean %s; weft ADD mean %s, DEL mean %s" % (
    mean("weft_agent_reconcile_duration_seconds"),
    mean("weft_agent_cni_duration_seconds", '{command="ADD"}'),
    mean("weft_agent_cni_duration_seconds", '{command="DEL"}')))
if sys.argv[2]:
    adds = re.search(r'^weft_agent_cni_duration_seconds_count\{command="ADD"\} (\S+)', text, re.M)
    print("limits: %s ports shaped while their pod was there, of %s ADDs" % (
        sys.argv[2], int(float(adds.group(1))) if adds else "n/a"))
PY
# WEFT_BENCH_AGENT_LOG=FILE keeps the agent's log (its mirror and shaping task at info).
if [ -n "${WEFT_BENCH_AGENT_LOG:-}" ]; then cp "$TMP/agent.log" "$WEFT_BENCH_AGENT_LOG"; fi
exit "$RC"
