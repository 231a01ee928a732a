#!/usr/bin/env bash
# End-to-end tests on the real cluster of cluster.sh: weft installed by Helm, pods wired by
# kubelet through containerd's CRI, resources judged by kube-apiserver.
#
#   e2e/cluster/test.sh            # brings the cluster up, runs every test, takes it down
#   KEEP=1 e2e/cluster/test.sh     # leaves the cluster up afterwards (cluster.sh down removes it)
#   ONLY="install nat" ...         # runs only the named tests (install always runs)
#   REUSE=1 KEEP=1 ...             # runs on a cluster left up by KEEP=1, with new images
#
# Prints PASS/FAIL per test and a closing "N passed, N failed" line; exits non-zero on failure.
# Figures (controller failover) go to $WEFT_CLUSTER_DIR/results.txt.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
C=$here/cluster.sh
dir=${WEFT_CLUSTER_DIR:-/var/tmp/weft-cluster}
export WEFT_CLUSTER_DIR=$dir
ns=weft-e2e
# shellcheck source=../lib.sh
. "$here/../lib.sh"
ALWAYS=install

k() { "$C" kubectl "$@"; }
kn() { "$C" kubectl -n "$ns" "$@"; }
lan() { "$C" lan "$@"; }
node() { "$C" node "$@"; }



dump_state() {
  local f=$dir/failure-$1.txt
  {
    echo "### pods"; k get pods -A -o wide
    echo "### weft"; k get networks,nodenetworks,portforwards -A -o yaml
    echo "### events"; k get events -A --sort-by=.lastTimestamp | tail -40
    for p in $(k -n weft-system get pods -o name 2>/dev/null); do
      echo "### logs $p"; k -n weft-system logs "$p" --tail=60 2>&1
    done
  } >"$f" 2>&1
  log "state dumped to $f"
  tail -n 80 "$f" | sed 's/^/    | /' >&2
}

# ------------------------------------------------------------------------------ helpers
pod_ip() { kn get pod "$1" -o jsonpath='{.status.podIP}'; }
pod_ips() { kn get pod "$1" -o jsonpath='{range .status.podIPs[*]}{.ip}{" "}{end}'; }
xc() { local p=$1; shift; kn exec "$p" -- "$@"; } # run in a pod
# HTTP/1.0 GET with busybox nc (the static busybox's wget crashes in a container without NSS
# libraries). nc_get NC SECONDS URL prints the shell command that sends the request; the
# answer's body is read from it with http_body.
nc_get() {
  local re='^http://(\[([^]]+)\]|([^:/]+))(:([0-9]+))?(/.*)?$'
  [[ $3 =~ $re ]] || { log "bad url $3"; return 2; }
  printf "printf '%s' | %s -w %s %s %s" "GET ${BASH_REMATCH[6]:-/} HTTP/1.0\\r\\n\\r\\n" "$1" "$2" \
    "${BASH_REMATCH[2]:-${BASH_REMATCH[3]}}" "${BASH_REMATCH[5]:-80}"
}
http_body() { tr -d '\r' | sed '1,/^$/d' | grep .; }
# pod url -> body; fails when no answer comes within 5 s.
http_get() {
  local cmd
  cmd=$(nc_get nc 5 "$2") || return 2
  xc "$1" sh -c "$cmd" 2>/dev/null | http_body
}
http_ok() { http_get "$@" >/dev/null 2>&1; }
outside_sees() { [ "$(outside_get "$1")" = "$2" ]; }
# The same from the outside host (the LAN namespace): url -> body, within 3 s.
outside_get() {
  local cmd
  cmd=$(nc_get "busybox nc" 3 "$1") || return 2
  "$C" lan sh -c "$cmd" 2>/dev/null | http_body
}
http_fails() { ! http_get "$@" >/dev/null 2>&1; }

# A pod running busybox httpd on port 80 that answers with its name; NODE, LABELS, ANNOTATIONS,
# and its container's PORTS (a hostPort).
testpod() { # name node labels(json) annotations(json) ports(json)
  local name=$1 nodename=$2 labels=${3:-'{}'} annotations=${4:-'{}'} ports=${5:-'[]'}
  kn apply -f - >/dev/null <<EOF
{"apiVersion": "v1", "kind": "Pod",
 "metadata": {"name": "$name", "labels": $labels, "annotations": $annotations},
 "spec": {"nodeName": "$nodename", "terminationGracePeriodSeconds": 1,
  "containers": [{"name": "c", "image": "weft.test/testbox:1", "imagePullPolicy": "Never",
   "ports": $ports,
   "command": ["/bin/sh", "-c",
     "mkdir -p /www/cgi-bin && echo $name > /www/index.html && printf '#!/bin/sh\\\\necho Content-Type: text/plain\\\\necho\\\\necho \$REMOTE_ADDR\\\\n' > /www/cgi-bin/ip && chmod +x /www/cgi-bin/ip && exec httpd -f -p 80 -h /www"]}]}}
EOF
}
wait_pods() { kn wait --for=condition=Ready "${@/#/pod/}" --timeout=120s >/dev/null; }

# The outside host (the LAN router, 10.77.0.1): an HTTP server whose /cgi-bin/ip answers with
# the client's address as it arrives.
outside_up() {
  local www=$dir/outside-www
  mkdir -p "$www/cgi-bin"
  echo outside >"$www/index.html"
  printf '#!/bin/sh\necho Content-Type: text/plain\necho\necho $REMOTE_ADDR\n' >"$www/cgi-bin/ip"
  chmod +x "$www/cgi-bin/ip"
  lan busybox httpd -p 10.77.0.1:8081 -h "$www"
}
outside_down() { pkill -f "busybox httpd -p 10.77.0.1:8081" 2>/dev/null || true; }

cond_is() { test "$(condition "$1" "$2" "$3" "$4")" = "$5"; }
condition() { # kind name namespace-or-empty type -> status
  local nsarg=()
  [ -n "$3" ] && nsarg=(-n "$3")
  k get "$1" "$2" "${nsarg[@]}" -o jsonpath="{.status.conditions[?(@.type==\"$4\")].status}"
}

# ------------------------------------------------------------------------------ tests
crds=(networks.weft.dev portforwards.weft.dev nodenetworks.weft.dev
  clustersegmentationpolicies.weft.dev segmentationpolicies.weft.dev trafficmirrors.weft.dev
  workloadslices.weft.dev)

t_install() {
  expect "helm install" "$C" helm install weft "$repo/charts/weft" -n weft-system --create-namespace \
    --set image.tag=dev --set image.pullPolicy=Never \
    --set kubernetesServiceHost=10.77.0.1 --set kubernetesServicePort=6443 \
    --set agent.defaultNetwork=e2e-nat --wait --timeout 240s || return 1
  local c
  for c in "${crds[@]}"; do
    expect "CRD $c Established" k wait --for=condition=Established "crd/$c" --timeout=30s || return 1
  done
  expect "controller Ready (2 replicas)" k -n weft-system rollout status deploy/weft-controller --timeout=120s &&
    expect "agent Ready on both nodes" k -n weft-system rollout status ds/weft-agent --timeout=120s
}

# A pod started on node2 reaches node1's policy groups as soon as node2 publishes it: the time
# from node2's NodeNetwork status naming the pod's address (seen by a watch) to node1's nftables
# holding it — through the controller, which copies it into the Network's WorkloadSlice that
# node1's agent watches —, for a few pods. Figures to $dir/results.txt.
t_peers() {
  local i ip t0 t1 ms samples=()
  for i in 1 2 3 4 5; do
    rm -f "$dir/peers-watch" "$dir/peers-node1"
    # node2's publications, timestamped as they arrive.
    k get nodenetwork node2 -w --output-watch-events -o json 2>/dev/null | python3 -u -c '
import json, sys, time
for line in sys.stdin:
    w = json.loads(line)["object"].get("status", {}).get("workloads", [])
    print("%.6f %s " % (time.time(), " ".join(x["ips"][0] for x in w if x.get("ips"))))' >"$dir/peers-watch" &
    local watch=$!
    # node1's rules, looked at every few milliseconds.
    node node1 timeout 120 sh -c 'while :; do echo "$(date +%s.%N) $(nft list ruleset | grep -o "10\.20\.[0-9.]*" | sort -u | tr "\n" " ")"; sleep 0.005; done' peers-probe \
      >"$dir/peers-node1" 2>/dev/null &
    local poller=$!
    sleep 1
    testpod "peer-$i" node2 '{"app": "web"}'
    kn wait --for=condition=Ready "pod/peer-$i" --timeout=60s >/dev/null || { kill $watch $poller; fail "peer-$i not Ready"; return 1; }
    ip=$(pod_ip "peer-$i")
    eventually 10 "peer-$i ($ip) is in node1's rules" grep -q " $ip " "$dir/peers-node1" || { kill $watch $poller; return 1; }
    # It reached node1 through its Network's WorkloadSlices, which name node2 for it.
    expect "peer-$i ($ip) is in a WorkloadSlice of e2e-nat, on node2" in_slice e2e-nat node2 "$ip" ||
      { kill $watch $poller; return 1; }
    sleep 0.5
    kill $watch $poller 2>/dev/null; pkill -f "get nodenetwork node2 -w|peers-probe" 2>/dev/null
    t0=$(awk -v ip="$ip" '{ for (i = 2; i <= NF; i++) if ($i == ip) { print $1; exit } }' "$dir/peers-watch")
    t1=$(awk -v ip="$ip" '{ for (i = 2; i <= NF; i++) if ($i == ip) { print $1; exit } }' "$dir/peers-node1")
    [ -n "$t0" ] && [ -n "$t1" ] || { fail "no publication or rule seen for $ip"; return 1; }
    ms=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", (b - a) * 1000 }')
    samples+=("$ms")
    kn delete pod "peer-$i" --wait=false >/dev/null
  done
  echo "peers: node2 publication -> node1 rules (ms): ${samples[*]}" | tee -a "$dir/results.txt" >&2
}

# in_slice NETWORK NODE IP: a WorkloadSlice of NETWORK names IP on NODE.
in_slice() {
  k get workloadslices -l "weft.dev/network=$1" -o json | python3 -c '
import json, sys
net, node, ip = sys.argv[1:4]
ws = [w for s in json.load(sys.stdin)["items"] if s["spec"]["network"] == net for w in s["spec"].get("workloads", [])]
sys.exit(0 if any(w["node"] == node and ip in w["ips"] for w in ws) else 1)' "$1" "$2" "$3"
}

# Each component has exactly the chart's permissions, and an agent speaks only for its own node.
t_trust() {
  local sa=system:serviceaccount:weft-system
  # What the code uses is granted (no request of theirs was refused: checked in their logs below).
  expect "the agent may list pods and patch NodeNetwork status" \
    can "$sa:weft-agent" list pods && can "$sa:weft-agent" patch nodenetworks --subresource=status || return 1
  expect "the controller may patch Networks and create NodeNetworks and WorkloadSlices" \
    can "$sa:weft-controller" patch networks && can "$sa:weft-controller" create nodenetworks &&
    can "$sa:weft-controller" patch workloadslices || return 1
  expect "the agent may watch WorkloadSlices" can "$sa:weft-agent" watch workloadslices || return 1
  expect "the controller may watch pods (a node speaks only for its own)" can "$sa:weft-controller" watch pods || return 1
  # What it does not use is refused.
  local denied=("weft-agent patch nodenetworks" "weft-agent patch workloadslices" "weft-controller delete workloadslices"
    "weft-agent delete pods" "weft-agent get secrets"
    "weft-agent patch networks --subresource=status" "weft-controller update networks" "weft-controller delete nodenetworks"
    "weft-controller update networks --subresource=status" "weft-controller get secrets" "weft-controller delete pods")
  local d
  for d in "${denied[@]}"; do
    set -- $d
    expect "$1 may not ${*:2}" cannot "$sa:$1" "${@:2}" || return 1
  done
  # An agent's own token (bound to its pod, so naming its node) on the real API server.
  expect "the own-node admission policy is installed" k get validatingadmissionpolicy weft-agent-own-node || return 1
  # Both nodes' NodeNetworks exist (the controller writes one for a node some Network selects).
  k apply -f - >/dev/null <<'EOF' || return 1
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: e2e-trust}
spec: {mode: NAT, subnets: [10.98.0.0/16]}
EOF
  eventually 60 "NodeNetworks node1 and node2 written" k get nodenetwork node1 node2 || return 1
  local pod uid token
  pod=$(k -n weft-system get pods -l app.kubernetes.io/component=agent --field-selector spec.nodeName=node1 \
    -o jsonpath='{.items[0].metadata.name}')
  uid=$(k -n weft-system get pod "$pod" -o jsonpath='{.metadata.uid}')
  token=$(k -n weft-system create token weft-agent --bound-object-kind Pod --bound-object-name "$pod" \
    --bound-object-uid "$uid" --duration 10m) || { fail "no token for $pod"; return 1; }
  # The agent's own request: a PATCH of the status subresource (dry run: nothing is written).
  local nn=/apis/weft.dev/v1alpha1/nodenetworks patch='{"status":{"lastError":"written by the e2e test"}}' out
  out=$(patch_as "$token" "$nn/node1/status" "$patch")
  expect "node1's agent token may write node1's NodeNetwork status ($out)" test "$out" = 200 || return 1
  out=$(patch_as "$token" "$nn/node2/status" "$patch")
  log "node1's token on node2: $out"
  expect "node1's agent token may not write node2's NodeNetwork status" \
    grep -q "^403 .*may write the status of NodeNetwork node1 only, not of node2" <<<"$out" || return 1
  out=$(patch_as "$token" "$nn/node1" '{"spec":{"blocks":[]}}')
  expect "nor node1's NodeNetwork spec ($out)" grep -q "^403 " <<<"$out" || return 1
  k delete network e2e-trust --wait=false >/dev/null
  # Neither component met a refusal while the tests above ran.
  local p logs
  for p in $(k -n weft-system get pods -l app.kubernetes.io/name=weft -o name); do
    logs=$(k -n weft-system logs "$p" --all-containers 2>&1)
    expect "no request of $p was refused" not_refused "$logs" || return 1
  done
}
can() { local who=$1; shift; [ "$(k auth can-i --as="$who" "$@" 2>/dev/null)" = yes ]; }
cannot() { local who=$1; shift; [ "$(k auth can-i --as="$who" "$@" 2>/dev/null)" = no ]; }
# An API refusal always says Forbidden (reason and message); a bare 403 may be a resource
# version ("too old resource version: 400 (403)").
not_refused() { ! grep -qi 'forbidden' <<<"$1"; }
# patch_as TOKEN PATH JSON: a merge-patch dry run as the token's user; prints the HTTP status
# and, when refused, the API server's message.
patch_as() {
  lan python3 - "$1" "$2" "$3" "$dir/pki/ca.crt" <<'EOF'
import json, ssl, sys, urllib.error, urllib.request
token, path, body, ca = sys.argv[1:5]
req = urllib.request.Request(
    "https://10.77.0.1:6443" + path + "?dryRun=All", data=body.encode(), method="PATCH",
    headers={"Authorization": "Bearer " + token, "Content-Type": "application/merge-patch+json"})
try:
    with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=ca)) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code, json.load(e).get("message", ""))
EOF
}

t_validation() {
  k create namespace weft-validation --dry-run=client -o yaml | k apply -f - >/dev/null
  expect "validation table through the API server" \
    "$repo/e2e/validation/check-apiserver.sh" "$dir/pki/admin.kubeconfig" "$dir/wrap/kubectl"
}

# The test namespace and the NAT Network e2e-nat (the agents' default), both nodes Ready with it.
nat_network() {
  k create namespace "$ns" --dry-run=client -o yaml | k apply -f - >/dev/null
  k apply -f - >/dev/null <<'EOF' || return 1
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: e2e-nat}
spec:
  mode: NAT
  subnets: [10.20.0.0/16, "fd20::/64"]
  ipam: {nodeBlockPrefix: 24, nodeBlockPrefixV6: 120}
EOF
  eventually 60 "Network e2e-nat Ready" cond_is network e2e-nat '' Ready True || return 1
  eventually 90 "both nodes Ready (weft's conflist written)" \
    sh -c "[ \"\$('$C' kubectl get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{end}')\" = TrueTrue ]"
}

t_nat() {
  nat_network || return 1
  testpod a1 node1 '{"app": "web"}'
  testpod a2 node1 '{"app": "db"}'
  testpod a3 node1 '{"app": "other"}'
  testpod b1 node2 '{"app": "web"}'
  expect "pods started through kubelet, containerd and weft" wait_pods a1 a2 a3 b1 || return 1
  local a1 a2 b1
  a1=$(pod_ip a1) a2=$(pod_ip a2) b1=$(pod_ip b1)
  log "a1=$(pod_ips a1) a2=$a2 b1=$b1"
  expect "a1's address is from e2e-nat" grep -qE '^10\.20\.' <<<"$a1" &&
    expect "a1 has an IPv6 address from e2e-nat" grep -qE 'fd20::' <<<"$(pod_ips a1)" &&
    expect "a1 -> a2 (same node)" http_ok a1 "http://$a2/" &&
    expect "a1 -> a2 over IPv6" http_ok a1 "http://[$(pod_ips a2 | awk '{print $2}')]/" &&
    expect "a1 -> outside is masqueraded to node1's address" \
      test "$(http_get a1 http://10.77.0.1:8081/cgi-bin/ip)" = 10.77.0.11 &&
    expect "b1 -> outside is masqueraded to node2's address" \
      test "$(http_get b1 http://10.77.0.1:8081/cgi-bin/ip)" = 10.77.0.12
}

t_portforward() {
  kn apply -f - >/dev/null <<'EOF' || return 1
apiVersion: weft.dev/v1alpha1
kind: PortForward
metadata: {name: a1-http}
spec:
  network: e2e-nat
  target: {workload: a1}
  ports: [{name: http, protocol: TCP, port: 8080, targetPort: 80}]
EOF
  eventually 30 "PortForward a1-http Valid=True (no conflict with itself)" \
    sh -c "[ \"\$('$C' kubectl -n $ns get portforward a1-http -o jsonpath='{.status.conditions[?(@.type==\"Valid\")].status}')\" = True ]" || return 1
  eventually 30 "outside -> node1:8080 -> a1:80" outside_sees http://10.77.0.11:8080/ a1 &&
    expect "b1 (node2) -> node1:8080 -> a1" test "$(http_get b1 http://10.77.0.11:8080/)" = a1
}

t_policy() {
  kn apply -f - >/dev/null <<'EOF' || return 1
apiVersion: weft.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: db-from-web}
spec:
  subject: {podSelector: {matchLabels: {app: db}}}
  ingress:
    - {name: http, action: Allow, from: [{pods: {podSelector: {matchLabels: {app: web}}}}], protocols: [{protocol: TCP, port: 80}]}
EOF
  local a2; a2=$(pod_ip a2)
  eventually 20 "a3 (app=other) -> a2 (app=db) denied" http_fails a3 "http://$a2/" &&
    expect "a1 (app=web) -> a2 allowed" http_ok a1 "http://$a2/" &&
    expect "a3 -> a1 (no policy on web) still allowed" http_ok a3 "http://$(pod_ip a1)/"
}

# A TrafficMirror of the web pods (a1 on node1, b1 on node2) to the analyzer app=other (a3, on
# node1 only): node1 copies a1's frames into a3's port, node2 reports that it has no analyzer,
# and the controller sums both into the mirror's status.
t_mirror() {
  kn apply -f - >/dev/null <<'EOF' || return 1
apiVersion: weft.dev/v1alpha1
kind: TrafficMirror
metadata: {name: web-tap}
spec:
  sources: {selector: {matchLabels: {app: web}}}
  direction: Both
  filter: {protocols: [TCP], ports: [{port: 80}]}
  destination: {analyzer: {selector: {matchLabels: {app: other}}}}
EOF
  eventually 30 "node1 has a mirror filter on a workload port" node_mirrors node1 || return 1
  expect "node2 has none (no analyzer there)" not node_mirrors node2 || return 1
  eventually 30 "status: 1 source mirrored, node2 named for its missing analyzer" \
    sh -c "[ \"\$('$C' kubectl -n $ns get trafficmirror web-tap -o jsonpath='{.status.sources}/{.status.nodes}/{.status.conditions[?(@.type==\"Ready\")].reason}')\" = '1/[\"node1\"]/NotMirrored' ] && '$C' kubectl -n $ns get trafficmirror web-tap -o jsonpath='{.status.problems}' | grep -q 'node2: no analyzer pod'" || return 1
  local a1; a1=$(pod_ip a1)
  http_ok a2 "http://$a1/" || { fail "a2 -> a1"; return 1; }
  eventually 60 "status: the copies of a2 -> a1:80 are counted" \
    sh -c "[ \"\$('$C' kubectl -n $ns get trafficmirror web-tap -o jsonpath='{.status.packets}')\" -gt 0 ]" || return 1
  k -n "$ns" delete trafficmirror web-tap --wait --timeout=30s >/dev/null
  eventually 30 "the filters go with the mirror" not node_mirrors node1
}
# Per-workload limits through the real path: pod annotations read by the agent, the bandwidth
# capability passed by containerd, a refused ADD for a bad annotation, a conntrack budget that
# holds under held-open connections, and the anomaly as an Event on the pod.
t_limits() {
  testpod lim node1 '{"app": "lim"}' '{"weft.dev/conntrack-entries": "20"}'
  testpod shaped node1 '{"app": "shaped"}' '{"kubernetes.io/egress-bandwidth": "1M", "kubernetes.io/ingress-bandwidth": "2M"}'
  testpod badlimit node1 '{"app": "bad"}' '{"weft.dev/max-connections": "lots"}'
  expect "pods with limits started" wait_pods lim shaped || return 1
  eventually 30 "a bad limit annotation fails the pod's ADD, naming the annotation" \
    sh -c "'$C' kubectl -n $ns get events --field-selector involvedObject.name=badlimit -o jsonpath='{.items[*].message}' | grep -q 'annotation weft.dev/max-connections'" || return 1
  eventually 30 "shaped's traffic is shaped both ways on node1 (tbf 2Mbit in, 1Mbit out), with weft's burst, not containerd's 2^32 - 1 bits" \
    sh -c "'$C' node node1 tc qdisc show | grep -q 'tbf.*rate 2Mbit burst 32Kb' && '$C' node node1 tc qdisc show | grep -q 'tbf.*rate 1Mbit burst 32Kb'" || return 1
  local lim; lim=$(pod_ip lim)
  expect "a1 -> lim" http_ok a1 "http://$lim/" || return 1
  # 30 connections held open from a3 (httpd waits for their requests): 20 fit lim's budget.
  xc a3 sh -c "for i in \$(seq 30); do sleep 20 | nc $lim 80 >/dev/null 2>&1 & done; sleep 1" >/dev/null 2>&1 &
  eventually 15 "lim's conntrack budget is full: a1 -> lim refused" http_fails a1 "http://$lim/" &&
    expect "a1 -> a2 (another budget) still works" http_ok a1 "http://$(pod_ip a2)/" &&
    eventually 15 "the anomaly is an Event on lim" \
      sh -c "'$C' kubectl -n $ns get events --field-selector involvedObject.name=lim -o jsonpath='{.items[*].reason}' | grep -q ConntrackBudgetReached" || return 1
  # A limit annotation that turns invalid after the pod started (no ADD to fail): a Warning
  # Event on the pod from weft's agent, naming the annotation, that kubectl describe shows.
  kn annotate pod lim weft.dev/max-connections=lots --overwrite >/dev/null || return 1
  eventually 30 "an invalid annotation on the running lim is a Warning Event on it from weft's agent, naming the annotation" \
    sh -c "'$C' kubectl -n $ns get events --field-selector involvedObject.name=lim,type=Warning -o jsonpath='{range .items[*]}{.reason}/{.reportingComponent}/{.message};{end}' | grep -q 'InvalidLimitAnnotation/weft-agent/annotation weft.dev/max-connections: '" &&
    expect "kubectl describe pod lim shows it" sh -c "'$C' kubectl -n $ns describe pod lim | grep -q InvalidLimitAnnotation" || return 1
  kn annotate pod lim weft.dev/max-connections- >/dev/null || return 1
  kn delete pod shaped badlimit --wait --timeout=60s >/dev/null
  # Its IFB link stays as a spare for the next pod with an egress limit (no port's alias).
  eventually 30 "the shaping goes with the pod (no 2Mbit tbf, no IFB in use on node1; its IFB a spare)" \
    sh -c "! '$C' node node1 tc qdisc show | grep -q 'rate 2Mbit' && ! '$C' node node1 ip -o link show type ifb | grep -q 'alias weft:shape:' && '$C' node node1 ip -o link show type ifb | grep -q 'alias weft:shape-spare'"
}

node_mirrors() { # node: a weft workload port of it has a mirred filter
  "$C" node "$1" sh -c 'for l in $(ip -o link show | grep -oE "wf[0-9a-f]{11}" | sort -u); do tc filter show dev "$l" ingress; done' 2>/dev/null | grep -q mirred
}

# `kubectl weft`, the plugin, found by kubectl on the PATH as users install it, against the
# pods and the policy of t_policy: a2 (app=db) admits app=web only.
t_kubectl_weft() {
  local profile=${WEFT_IMAGE_PROFILE:-release}
  [ "$profile" = dev ] && profile=debug
  local bin="$repo/target/$profile"
  [ -x "$bin/kubectl-weft" ] || { fail "kubectl-weft is built ($bin)"; return 1; }
  local KUBECONFIG BIN
  eval "$("$C" env)"
  # kubectl takes no flag before a plugin's name: the kubeconfig goes in the environment.
  kw() { "$C" lan env "KUBECONFIG=$KUBECONFIG" "PATH=$bin:$BIN:$PATH" kubectl weft "$@"; }
  local a2 out
  a2=$(pod_ip a2)
  out=$(kw status) || { fail "kubectl weft status"; return 1; }
  log "$out"
  expect "status: both nodes Ready with e2e-nat" both_nodes_ready "$out" || return 1
  out=$(kw endpoints a2 -n "$ns") || { fail "kubectl weft endpoints a2"; return 1; }
  log "$out"
  expect "endpoints: a2's address and the policy that applies to it" \
    contains_all "$out" "$a2" "SegmentationPolicy $ns/db-from-web" || return 1
  expect "trace: a1 (app=web) -> a2:80 accepted (exit 0)" kw trace --from "$ns/a1" --to "$ns/a2" --port 80 &&
    expect "trace: a3 (app=other) -> a2:80 dropped (exit 1)" not kw trace --from "$ns/a3" --to "$ns/a2" --port 80 || return 1
  http_fails a3 "http://$a2/"
  eventually 20 "audit: the denial of a3 -> a2 is among the agents' records" audit_has_denial_to "$a2"
}
not() { ! "$@" >/dev/null 2>&1; }
both_nodes_ready() { grep -qE '^node1 +True .*e2e-nat' <<<"$1" && grep -qE '^node2 +True .*e2e-nat' <<<"$1"; }
contains_all() { # text strings...
  local text=$1 s; shift
  for s in "$@"; do grep -qF -- "$s" <<<"$text" || return 1; done
}
audit_has_denial_to() { kw audit --since-seconds 600 | grep '"verdict":"deny"' | grep -qF "\"dst\":\"$1\""; }

t_bridge_hybrid() {
  k apply -f - >/dev/null <<'EOF' || return 1
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: e2e-lan}
spec:
  mode: Bridge
  subnets: [10.77.0.0/24]
  gateway: [10.77.0.1]
  ipam:
    nodeBlockPrefix: 28
    exclude: [10.77.0.0/26]
  bridge: {uplink: eth0, bridgeName: br-e2e}
EOF
  eventually 60 "Network e2e-lan Ready" cond_is network e2e-lan '' Ready True || return 1
  eventually 60 "node1's uplink is on the bridge and node1 still reaches the API server" \
    sh -c "'$C' node node1 ip -o link show eth0 | grep -q 'master br-e2e' && '$C' kubectl get node node1 >/dev/null" || return 1
  testpod h1 node1 '{"app": "hybrid"}' '{"weft.dev/networks": "e2e-nat,e2e-lan"}'
  expect "hybrid pod started" wait_pods h1 || return 1
  local lanip
  lanip=$(xc h1 ip -4 -o addr show dev net1 | awk '{print $4}' | cut -d/ -f1)
  log "h1 eth0=$(pod_ip h1) net1=$lanip"
  expect "h1's net1 has a LAN address" grep -qE '^10\.77\.0\.' <<<"$lanip" &&
    expect "outside -> h1 on its LAN address" test "$(outside_get "http://$lanip/")" = h1 &&
    expect "h1 -> the LAN router leaves through net1 with h1's LAN address" \
      test "$(http_get h1 http://10.77.0.1:8081/cgi-bin/ip)" = "$lanip" &&
    expect "node1 -> h1's LAN address" node node1 ping -c1 -W2 "$lanip" &&
    eventually 30 "e2e-lan's addresses in use: h1's one LAN address (not the nodes' other workloads)" \
      sh -c "[ \"\$('$C' kubectl get network e2e-lan -o jsonpath='{.status.addressesInUse}')\" = 1 ]" &&
    expect "node1's e2e-lan store holds h1's net1" node node1 grep -q '"ifname":"net1"' /var/lib/weft/ipam/e2e-lan/allocations.json &&
    expect "h1 deleted (kubelet's DEL of eth0)" kn delete pod h1 --wait --timeout=60s &&
    eventually 30 "node1's e2e-lan store is empty once h1 is gone (its net1 detached with eth0)" \
      sh -c "'$C' node node1 grep -q '\"allocations\":\[\]' /var/lib/weft/ipam/e2e-lan/allocations.json"
}

t_status() {
  # A Node without a kubelet: the controller allocates it blocks; deleting it frees them.
  k apply -f - >/dev/null <<'EOF' || return 1
apiVersion: v1
kind: Node
metadata: {name: node3, labels: {weft.dev/e2e-solo: "yes"}}
EOF
  k apply -f - >/dev/null <<'EOF' || return 1
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: e2e-solo}
spec:
  mode: NAT
  subnets: [10.30.0.0/16]
  nodeSelector: {matchLabels: {weft.dev/e2e-solo: "yes"}}
EOF
  eventually 30 "node3 gets a block of e2e-solo" \
    sh -c "'$C' kubectl get nodenetwork node3 -o yaml | grep -q e2e-solo" || return 1
  expect "deleting node3's last-but-one Network finishes (finalizer removed)" \
    k delete network e2e-solo --timeout=30s &&
    eventually 30 "node3's NodeNetwork no longer holds e2e-solo" \
      sh -c "! '$C' kubectl get nodenetwork node3 -o yaml 2>/dev/null | grep -q e2e-solo" &&
    expect "delete Node node3" k delete node node3 --timeout=30s &&
    eventually 30 "node3's NodeNetwork and blocks are freed" \
      sh -c "! '$C' kubectl get nodenetwork node3 >/dev/null 2>&1"
}

# A node speaks only for the pods bound to it, with their own labels: node4, a Node without a
# kubelet (so no agent writes its NodeNetwork status but this test), publishes a pod bound to
# it under a label group of its choosing, and b1, node2's pod. The WorkloadSlices carry the
# first with the labels the API server gives it (and follow a relabelling), and not the second.
t_vouch() {
  vouch_steps
  local rc=$?
  # node4 must not outlive the test (a DaemonSet's pod for it would never run).
  k -n "$ns" delete pod forged --grace-period=0 --force --ignore-not-found >/dev/null 2>&1
  k delete node node4 --ignore-not-found --timeout=30s >/dev/null 2>&1
  return $rc
}

vouch_steps() {
  k apply -f - >/dev/null <<'EOF' || return 1
apiVersion: v1
kind: Node
metadata: {name: node4}
EOF
  local block
  eventually 30 "node4 gets a block of e2e-nat" \
    sh -c "'$C' kubectl get nodenetwork node4 -o jsonpath='{.spec.blocks[?(@.network==\"e2e-nat\")].ipv4}' | grep -q ." ||
    return 1
  block=$(k get nodenetwork node4 -o jsonpath='{.spec.blocks[?(@.network=="e2e-nat")].ipv4}')
  local base=${block%.*} own other kept claimed
  own=$base.5 other=$base.6 kept=$base.7 claimed=$base.8
  log "node4's block: $block"
  # Bound to node4, never started (no kubelet there); the launcher pod of a VM, fvm.
  kn apply -f - >/dev/null <<'EOF' || return 1
{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "forged", "labels": {"app": "web", "vm.kubevirt.io/name": "fvm"}},
 "spec": {"nodeName": "node4", "containers": [{"name": "c", "image": "weft.test/testbox:1"}]}}
EOF
  # Its reservation of fvm, and one of a VM that never ran on node4 (which that VM, started
  # on another node, would adopt: an address of node4's block, and its traffic).
  k patch nodenetwork node4 --subresource=status --type=merge -p "$(
    cat <<EOF
{"status": {"workloads": [
  {"network": "e2e-nat", "namespace": "$ns", "name": "forged", "labels": {"app": "db"}, "ips": ["$own"], "vm": "$ns/fvm"},
  {"network": "e2e-nat", "namespace": "$ns", "name": "b1", "labels": {"app": "web"}, "ips": ["$other"]}],
 "reservations": [
  {"vm": "$ns/fvm", "network": "e2e-nat", "ifname": "eth0", "ips": ["$kept"], "since": 1},
  {"vm": "$ns/victim", "network": "e2e-nat", "ifname": "eth0", "ips": ["$claimed"], "since": 2000000000}]}}
EOF
  )" >/dev/null || return 1
  eventually 30 "the slices carry node4's pod with the pod's label app=web, not the published app=db" \
    slice_label e2e-nat node4 "$own" web &&
    eventually 30 "the controller refuses node4's claim of node2's b1 (and logs why)" \
      refusal_says "$ns/b1 on network e2e-nat left out of policy groups: pod $ns/b1 runs on node node2, not on node4" &&
    expect "no slice carries node4's claim of b1" not in_slice e2e-nat node4 "$other" &&
    eventually 30 "the slices carry node4's reservation of fvm, whose launcher pod is bound there" \
      reserved_in_slice e2e-nat node4 "$ns/fvm" &&
    eventually 30 "the controller refuses node4's reservation of a VM that never ran there (and logs why)" \
      refusal_says "VM $ns/victim on network e2e-nat ignored: VM $ns/victim runs in no pod bound to node node4" &&
    expect "no slice carries node4's reservation of victim" not reserved_in_slice e2e-nat node4 "$ns/victim" ||
    return 1
  kn label pod forged app=api --overwrite >/dev/null || return 1
  eventually 30 "the pod relabelled app=api: its slice entry follows (node4 published nothing new)" \
    slice_label e2e-nat node4 "$own" api || return 1
  kn delete pod forged --grace-period=0 --force >/dev/null 2>&1
  eventually 30 "the pod deleted: node4's entry leaves the slices" not in_slice e2e-nat node4 "$own" &&
    expect "fvm gone from node4: the reservation taken while it ran there stays" \
      reserved_in_slice e2e-nat node4 "$ns/fvm" &&
    expect "within the deleted pod's grace, node4 still publishing it is no problem" \
      not refusal_says "no pod $ns/forged is bound to a node" &&
    eventually 60 "past the grace (30 s), node4 still publishing the deleted pod is refused (and logged)" \
      refusal_says "$ns/forged on network e2e-nat left out of policy groups: no pod $ns/forged is bound to a node" &&
    expect "delete Node node4" k delete node node4 --timeout=30s &&
    eventually 30 "node4's NodeNetwork is freed" sh -c "! '$C' kubectl get nodenetwork node4 >/dev/null 2>&1"
}

# slice_label NETWORK NODE IP APP: a WorkloadSlice of NETWORK names IP on NODE with label app=APP.
slice_label() {
  k get workloadslices -l "weft.dev/network=$1" -o json | python3 -c '
import json, sys
net, node, ip, app = sys.argv[1:5]
ws = [w for s in json.load(sys.stdin)["items"] if s["spec"]["network"] == net for w in s["spec"].get("workloads", [])]
sys.exit(0 if any(w["node"] == node and ip in w["ips"] and w.get("labels", {}).get("app") == app for w in ws) else 1)' "$@"
}

# reserved_in_slice NETWORK NODE VM: a WorkloadSlice of NETWORK holds NODE's reservation of VM.
reserved_in_slice() {
  k get workloadslices -l "weft.dev/network=$1" -o json | python3 -c '
import json, sys
net, node, vm = sys.argv[1:4]
rs = [r for s in json.load(sys.stdin)["items"] if s["spec"]["network"] == net for r in s["spec"].get("reservations", [])]
sys.exit(0 if any(r["node"] == node and r["vm"] == vm for r in rs) else 1)' "$@"
}

# refusal_says TEXT: the controllers' log (one line per entry left out, by the replica that
# writes) says TEXT. Events are kept an hour and a rerun's cluster would still show the last
# run's; the log is this installation's.
refusal_says() {
  k -n weft-system logs -l app.kubernetes.io/component=controller --tail=-1 2>/dev/null |
    grep -F "published workload left out" | grep -qF -- "$1"
}

# Seconds until the Lease is renewed again by a live controller after the leader's process gets
# SIGNAL: by the standby, or (after kill -9) by the leader's restarted container, whichever first.
failover() { # signal
  local sig=$1 lease=weft-controller holder renew pid t0 now
  holder=$(k -n weft-system get lease "$lease" -o jsonpath='{.spec.holderIdentity}')
  [ -n "$holder" ] || { fail "no leader holds the Lease $lease"; return 1; }
  pid=""
  for p in $(pgrep -f 'weft-operator controller'); do
    if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "POD_NAME=$holder"; then pid=$p; fi
  done
  [ -n "$pid" ] || { fail "no process for leader $holder"; return 1; }
  t0=$(date +%s.%N)
  kill "-$sig" "$pid"
  renew=$(k -n weft-system get lease "$lease" -o jsonpath='{.spec.renewTime}')
  local end=$((SECONDS + 60))
  while ((SECONDS < end)); do
    now=$(k -n weft-system get lease "$lease" -o jsonpath='{.spec.holderIdentity} {.spec.renewTime}' 2>/dev/null)
    # A holder and a renewal after the signal (the killed process cannot renew).
    if [ -n "${now%% *}" ] && [ "${now#* }" != "$renew" ] && ! kill -0 "$pid" 2>/dev/null; then
      local dt; dt=$(awk "BEGIN{printf \"%.2f\", $(date +%s.%N) - $t0}")
      echo "failover SIG$sig: $holder -> ${now%% *} in ${dt} s" | tee -a "$dir/results.txt" >&2
      return 0
    fi
    sleep 0.1
  done
  fail "no controller renewed the Lease within 60 s after SIG$sig of $holder"
}

t_failover() {
  expect "SIGTERM of the leader hands over" failover TERM &&
    eventually 60 "controller back to 2 Ready replicas" k -n weft-system rollout status deploy/weft-controller --timeout=5s &&
    expect "kill -9 of the leader hands over" failover KILL &&
    eventually 90 "controller back to 2 Ready replicas" k -n weft-system rollout status deploy/weft-controller --timeout=5s
}

t_upgrade() {
  local b; b=$("$C" env | sed -n 's/^BIN=//p')
  for n in node1 node2; do
    node "$n" "$b/ctr" -a "$dir/$n/containerd.sock" -n k8s.io images tag --force \
      ghcr.io/weft-dev/weft:dev ghcr.io/weft-dev/weft:dev2 >/dev/null
  done
  # New connections through the port forward, every 0.2 s, while the agents are replaced.
  local out=$dir/upgrade-traffic.txt
  : >"$out"
  (
    end=$((SECONDS + 100))
    while ((SECONDS < end)) && [ ! -e "$dir/upgrade-done" ]; do
      if [ "$(outside_get http://10.77.0.11:8080/)" = a1 ]; then
        echo ok >>"$out"
      else echo lost >>"$out"; fi
      sleep 0.2
    done
  ) &
  local loop=$!
  rm -f "$dir/upgrade-done"
  sleep 2
  expect "helm upgrade to a new image" "$C" helm upgrade weft "$repo/charts/weft" -n weft-system \
    --reuse-values --set image.tag=dev2 --wait --timeout 180s
  local up=$?
  k -n weft-system rollout status ds/weft-agent --timeout=120s >/dev/null
  sleep 3
  touch "$dir/upgrade-done"
  wait "$loop"
  local ok lost
  ok=$(grep -c ok "$out") lost=$(grep -c lost "$out")
  log "connections during the upgrade: $ok ok, $lost lost"
  [ "$up" = 0 ] && expect "no connection lost during the upgrade" test "$lost" = 0 &&
    expect "agents run the new image" sh -c "'$C' kubectl -n weft-system get ds weft-agent -o jsonpath='{.spec.template.spec.containers[0].image}' | grep -q dev2"
}

# The SYN proxy turned on in the installed chart as a user does (agent.synProxy): node1 answers
# the SYNs of a PortForward with synProxy and of a pod's hostPort with weft.dev/syn-proxy with
# cookies, and opens the connection to the pod only for the client's completing ACK, which
# /proc/net/stat/synproxy counts. Turned off again, both are forwarded without the proxy and
# node1's agent names them as problems, and the agents set nf_conntrack_tcp_loose back.
t_syn_proxy() {
  nat_network || return 1
  local loose1 loose2 rc=0
  loose1=$(node_loose node1) loose2=$(node_loose node2)
  expect "node1 tracks TCP loosely before (nf_conntrack_tcp_loose=$loose1)" test "$loose1" = 1 &&
    syn_proxy_on && syn_proxy_off || rc=1
  syn_proxy_cleanup "$loose1" "$loose2" || rc=1
  return $rc
}
syn_proxy_on() {
  expect "helm upgrade --set agent.synProxy=true, agents rolled out" syn_proxy_chart true &&
    expect "the agents run with --syn-proxy" agents_syn_proxy &&
    eventually 30 "node1's nf_conntrack_tcp_loose is 0" loose_is node1 0 &&
    eventually 30 "node2's nf_conntrack_tcp_loose is 0" loose_is node2 0 || return 1
  kn apply -f - >/dev/null <<'EOF' || return 1
apiVersion: weft.dev/v1alpha1
kind: PortForward
metadata: {name: syn-pf}
spec:
  network: e2e-nat
  target: {workload: syn-pf}
  ports: [{name: http, protocol: TCP, port: 8090, targetPort: 80}]
  synProxy: {}
EOF
  testpod syn-pf node1 '{"app": "syn-pf"}'
  testpod syn-hp node1 '{"app": "syn-hp"}' '{"weft.dev/syn-proxy": "true"}' \
    '[{"containerPort": 80, "hostPort": 8091, "protocol": "TCP"}]'
  expect "pods syn-pf and syn-hp (hostPort 8091) started" wait_pods syn-pf syn-hp &&
    eventually 30 "PortForward syn-pf Ready" cond_is portforward syn-pf "$ns" Ready True || return 1
  local c0 c1 c2
  c0=$(syn_cookies node1) || { fail "node1's /proc/net/stat/synproxy has a cookie_valid column"; return 1; }
  eventually 30 "outside -> node1:8090 (PortForward with synProxy) -> syn-pf" \
    outside_sees http://10.77.0.11:8090/ syn-pf || return 1
  c1=$(syn_cookies node1)
  expect "node1's SYN proxy completed it (cookie_valid $c0 -> $c1)" test "$c1" -gt "$c0" || return 1
  eventually 30 "outside -> node1:8091 (hostPort, weft.dev/syn-proxy) -> syn-hp" \
    outside_sees http://10.77.0.11:8091/ syn-hp || return 1
  c2=$(syn_cookies node1)
  expect "node1's SYN proxy completed it (cookie_valid $c1 -> $c2)" test "$c2" -gt "$c1" &&
    expect "node1's agent names no problem of a SYN proxy" no_syn_problem node1 &&
    eventually 30 "PortForward syn-pf's status.targets holds syn-pf's address (node1's report)" \
      pf_targets_have syn-pf "$(pod_ip syn-pf)" &&
    expect "PortForward syn-pf is not Degraded" not cond_is portforward syn-pf "$ns" Degraded True
}
pf_targets_have() { k -n "$ns" get portforward "$1" -o jsonpath='{.status.targets}' | grep -qF -- "\"$2\""; }
pf_degraded_by() { # portforward text: Degraded=True, its message containing text
  cond_is portforward "$1" "$ns" Degraded True &&
    k -n "$ns" get portforward "$1" -o jsonpath='{.status.conditions[?(@.type=="Degraded")].message}' | grep -qF -- "$2"
}
syn_proxy_off() {
  expect "helm upgrade --set agent.synProxy=false, agents rolled out" syn_proxy_chart false &&
    expect "the agents run without --syn-proxy" not agents_syn_proxy &&
    eventually 30 "node1's agent set nf_conntrack_tcp_loose back to 1" loose_is node1 1 &&
    eventually 30 "node2's agent set nf_conntrack_tcp_loose back to 1" loose_is node2 1 &&
    eventually 30 "node1's agent names the PortForward's synProxy as a problem" \
      has_syn_problem node1 "PortForward $ns/syn-pf:" &&
    eventually 30 "and the pod's weft.dev/syn-proxy" has_syn_problem node1 "$ns/syn-hp:" &&
    eventually 30 "PortForward syn-pf is Degraded: node1 forwards it without --syn-proxy" \
      pf_degraded_by syn-pf "node1: spec.synProxy" || return 1
  local c0 c1
  c0=$(syn_cookies node1) || { fail "node1's /proc/net/stat/synproxy has a cookie_valid column"; return 1; }
  eventually 30 "outside -> node1:8090 -> syn-pf, without the proxy" \
    outside_sees http://10.77.0.11:8090/ syn-pf &&
    eventually 30 "outside -> node1:8091 -> syn-hp, without the proxy" \
      outside_sees http://10.77.0.11:8091/ syn-hp || return 1
  c1=$(syn_cookies node1) || return 1
  expect "node1's SYN proxy completed neither (cookie_valid $c0 -> $c1)" test "$c1" = "$c0"
}
# Removes what t_syn_proxy made, whatever failed: the pods, the PortForward, agent.synProxy,
# and each node's nf_conntrack_tcp_loose set back to what it was (LOOSE1, LOOSE2) if a failure
# left it otherwise.
syn_proxy_cleanup() {
  kn delete portforward syn-pf --ignore-not-found --wait --timeout=30s >/dev/null
  kn delete pod syn-pf syn-hp --ignore-not-found --wait --timeout=60s >/dev/null
  if agents_syn_proxy; then
    expect "helm upgrade --set agent.synProxy=false" syn_proxy_chart false || return 1
  fi
  local n=1 v
  for v in "$1" "$2"; do
    [ -n "$v" ] && node "node$n" sysctl -qw "net.netfilter.nf_conntrack_tcp_loose=$v"
    expect "node$n's nf_conntrack_tcp_loose is back to $v" loose_is "node$n" "$v" || return 1
    n=$((n + 1))
  done
}
syn_proxy_chart() { # true|false: agent.synProxy in the installed release
  "$C" helm upgrade weft "$repo/charts/weft" -n weft-system --reuse-values \
    --set "agent.synProxy=$1" --wait --timeout 180s >/dev/null &&
    k -n weft-system rollout status ds/weft-agent --timeout=120s >/dev/null
}
agents_syn_proxy() {
  k -n weft-system get ds weft-agent -o jsonpath='{.spec.template.spec.containers[0].args}' |
    grep -q -- '"--syn-proxy"'
}
# nf_conntrack_tcp_loose of the node's network namespace (the sysctl is per namespace).
node_loose() { node "$1" cat /proc/sys/net/netfilter/nf_conntrack_tcp_loose; }
loose_is() { [ "$(node_loose "$1")" = "$2" ]; }
# Connections the node's SYN proxy completed: /proc/net/stat/synproxy's cookie_valid (of the
# node's namespace; a line per CPU, hexadecimal), summed.
syn_cookies() {
  local line f i col="" sum=0
  while read -r line; do
    read -r -a f <<<"$line"
    if [ -z "$col" ]; then
      for i in "${!f[@]}"; do [ "${f[i]}" = cookie_valid ] && col=$i; done
      [ -n "$col" ] || return 1
    else
      sum=$((sum + 16#${f[col]}))
    fi
  done < <(node "$1" cat /proc/net/stat/synproxy)
  [ -n "$col" ] && echo "$sum"
}
# The resource problems of a SYN proxy without --syn-proxy that the node's agent (its newest
# pod) logged; fails when there is no log to read.
syn_problems() {
  local pod log
  pod=$(k -n weft-system get pods -l app.kubernetes.io/component=agent --field-selector "spec.nodeName=$1" \
    --sort-by=.metadata.creationTimestamp -o jsonpath='{.items[-1:].metadata.name}')
  log=$(k -n weft-system logs "$pod" -c agent) || return 1
  grep 'resource problem' <<<"$log" | grep -F -- 'without --syn-proxy'
  return 0
}
has_syn_problem() { syn_problems "$1" | grep -qF -- "$2"; } # node object
no_syn_problem() { # node
  local p
  p=$(syn_problems "$1") || return 1
  [ -z "$p" ] || { log "$p"; return 1; }
}

node_clean() { # node: nothing of weft left
  local n=$1 out
  out=$(node "$n" ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -vxE 'lo|eth0')
  [ -z "$out" ] || { fail "$n still has links: $out"; return 1; }
  out=$(node "$n" nft list tables | grep -i weft)
  [ -z "$out" ] || { fail "$n still has nftables tables: $out"; return 1; }
  out=$(node "$n" find /etc/cni/net.d /opt/cni/bin /run/weft /var/lib/weft -mindepth 1 2>/dev/null)
  [ -z "$out" ] || { fail "$n still has files: $out"; return 1; }
  out=$(node "$n" ip -o addr show dev eth0 | grep -c 'inet ')
  [ "$out" = 1 ] || { fail "$n's eth0 lost or gained IPv4 addresses"; return 1; }
  node "$n" ip route show default | grep -q 'dev eth0' || { fail "$n's default route is not on eth0"; return 1; }
}

# The chart's monitoring objects (off by default): rendered with every part on, their shape
# checked, and the dashboard's ConfigMap judged by the API server (this cluster has no
# Prometheus Operator CRDs for the PodMonitor and PrometheusRule).
t_monitoring() {
  "$C" helm template weft "$repo/charts/weft" -n weft-system \
    --set monitoring.podMonitor.enabled=true --set monitoring.prometheusRule.enabled=true \
    --set monitoring.dashboard.enabled=true --show-only templates/monitoring.yaml \
    >"$dir/monitoring.yaml" || { fail "helm renders the monitoring objects"; return 1; }
  rm -f "$dir"/monitoring-*.yaml
  awk -v d="$dir/monitoring-" '/^---/ { n++; next } { print > (d n ".yaml") }' "$dir/monitoring.yaml"
  local f kinds=() cm=""
  for f in "$dir"/monitoring-*.yaml; do
    kinds+=("$(awk '/^kind:/ { print $2; exit }' "$f")")
    grep -q '^kind: ConfigMap' "$f" && cm=$f
  done
  expect "a PodMonitor, a PrometheusRule and a dashboard ConfigMap" \
    test "$(printf '%s\n' "${kinds[@]}" | sort | tr '\n' ' ')" = "ConfigMap PodMonitor PrometheusRule " || return 1
  expect "the rule group holds weft's alerts" \
    test "$(grep -c -- '- alert: Weft' "$dir/monitoring.yaml")" -ge 5 || return 1
  expect "the API server accepts the dashboard's ConfigMap, and its JSON parses" \
    sh -c "'$C' kubectl apply --dry-run=server -f '$cm' -o jsonpath='{.data.weft\\.json}' |
      python3 -c 'import json, sys; assert json.load(sys.stdin)[\"panels\"]'"
}

t_teardown() {
  kn delete pod --all --wait --timeout=60s >/dev/null
  eventually 30 "node1 holds no workload port after the pods are deleted" \
    sh -c "! '$C' node node1 ip -o link show | grep -qE '^[0-9]+: wf'" || return 1
  k delete -n "$ns" portforward --all --wait --timeout=30s >/dev/null
  k delete -n "$ns" segmentationpolicy --all --wait --timeout=30s >/dev/null
  expect "deleting the Networks finishes" k delete network --all --wait --timeout=60s || return 1
  # A Network left behind at uninstall (it selects no node): with the controller gone, the
  # uninstall hook takes the controller's finalizer off, so that it can still be deleted.
  k apply -f - >/dev/null <<'EOF' || return 1
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: e2e-left-behind}
spec: {mode: NAT, subnets: [10.97.0.0/16], nodeSelector: {matchLabels: {weft-e2e: none}}}
EOF
  eventually 30 "the controller puts its finalizer on a new Network" \
    sh -c "'$C' kubectl get network e2e-left-behind -o jsonpath='{.metadata.finalizers}' | grep -q weft.dev/cleanup" || return 1
  expect "helm uninstall" "$C" helm uninstall weft -n weft-system --wait --timeout 120s || return 1
  expect "a Network left behind is deleted without a controller" \
    k delete network e2e-left-behind --wait --timeout=30s || return 1
  eventually 60 "node1 is left as it was" node_clean node1 &&
    eventually 60 "node2 is left as it was" node_clean node2
}

# ------------------------------------------------------------------------------ main
cleanup() {
  outside_down
  if [ "${KEEP:-0}" != 1 ]; then "$C" down; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "=== cluster up"
start=$SECONDS
if [ "${REUSE:-0}" = 1 ]; then
  # A cluster left by KEEP=1: new images, and weft's leftovers removed.
  "$C" load-images 2>/dev/null
  k delete namespace "$ns" weft-validation --ignore-not-found --wait --timeout=120s >/dev/null 2>&1
  k delete network --all --timeout=60s >/dev/null 2>&1
  k delete node node3 node4 --timeout=20s >/dev/null 2>&1
  "$C" helm uninstall weft -n weft-system --wait --timeout 120s >/dev/null 2>&1
elif ! "$C" up; then
  echo "FAIL cluster-up"
  echo "0 passed, 1 failed"
  exit 1
fi
echo "cluster up in $((SECONDS - start)) s"
outside_up

run install t_install
if [ "$failed" = 0 ]; then
  run validation t_validation
  run nat t_nat
  run portforward t_portforward
  run policy t_policy
  run mirror t_mirror
  run limits t_limits
  run kubectl-weft t_kubectl_weft
  run peers t_peers
  run bridge t_bridge_hybrid
  run status t_status
  run vouch t_vouch
  run monitoring t_monitoring
  run trust t_trust
  run failover t_failover
  run upgrade t_upgrade
  run synproxy t_syn_proxy
  run teardown t_teardown
fi

echo
[ "$failed" = 0 ] || echo "failed: ${failures[*]}"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
