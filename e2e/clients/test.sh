#!/usr/bin/env bash
# weft driven by the CNI clients users run, not by kubelet: libcni v1.1.2 and v1.3.0 (cnictl, a
# small program over libcni, as runtimes embed it), containerd 1.6's `ctr run --cni` and podman
# 4's CNI backend (both from Debian, with a private root, state and configuration).
#
#   e2e/clients/test.sh            # installs what it needs, runs every test, removes everything
#   ONLY="libcni112 podman" ...    # runs only the named tests
#   KEEP=1 ...                     # leaves the node, the agent and the runtimes up afterwards
#
# One node (network namespace ${prefix}-node, uplink eth0 10.79.0.11/24) behind a LAN
# (${prefix}-lan, 10.79.0.1/24) runs a standalone agent (`weft-operator agent --manifests`) with
# one NAT Network; the agent installs the `weft` binary and the conflist into the node's private
# CNI directories, and every client runs inside the node's network namespace with the node's
# locations in its environment (WEFT_STATE_DIR, WEFT_AGENT_SOCKET), as a runtime on a node does.
#
# Prints PASS/FAIL per test and a closing "N passed, N failed" line; exits non-zero on failure.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
prefix=${WEFT_CLIENTS_PREFIX:-weftr}
dir=${WEFT_CLIENTS_DIR:-/var/tmp/weft-clients}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/weft-clients
profile_dir=$repo/target/debug
node=$prefix-node
lan=$prefix-lan
net=natr
cycles=${CYCLES:-20}
# shellcheck source=../lib.sh
. "$here/../lib.sh"
POLL=0.2

dump_state() {
  echo "--- agent log (last 30 lines)" >&2; tail -n 30 "$dir/agent.log" >&2 2>/dev/null
  echo "--- node links" >&2; ip -n "$node" -br link >&2 2>/dev/null
  echo "--- weft CNI log (last 10 lines)" >&2; tail -n 10 "$dir/weft-cni.log" >&2 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
# Set-up

install_packages() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v podman >/dev/null || missing+=(podman)
  command -v runc >/dev/null || missing+=(runc)
  command -v conmon >/dev/null || missing+=(conmon)
  command -v busybox >/dev/null || missing+=(busybox-static)
  command -v python3 >/dev/null || missing+=(python3)
  if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# cnictl against both libcni versions (Go's build cache makes a rebuild cheap).
build_cnictl() {
  mkdir -p "$cache"
  (cd "$here/cnictl" && go build -trimpath -o "$cache/cnictl-v1.3.0" . &&
    go build -trimpath -modfile=go.libcni112.mod -tags libcni112 -o "$cache/cnictl-v1.1.2" .)
}

# Removes everything this script creates (also what an interrupted earlier run left).
teardown() {
  pkill -f -- "--root $dir/podman/root" 2>/dev/null
  pkill -f -- "$dir/containerd/" 2>/dev/null
  stop_agent
  sleep 0.3
  pkill -9 -f -- "$dir/" 2>/dev/null
  [ -f "$dir/node.pid" ] && kill -9 "$(cat "$dir/node.pid")" 2>/dev/null
  for m in $(awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null
  done
  for n in $(ip netns list | awk -v p="$prefix-" 'index($1, p) == 1 { print $1 }'); do
    ip netns del "$n" 2>/dev/null
  done
  # The node's directories created on this machine for its private mounts (deepest first).
  [ -f "$dir/created" ] && sort -r "$dir/created" | xargs -r rmdir 2>/dev/null
  rm -rf "$dir"
}

setup_node() {
  mkdir -p "$dir"/{state,manifests,images,run}
  ip netns add "$lan" && ip netns add "$node" || return 1
  ip -n "$lan" link set lo up && ip -n "$node" link set lo up
  ip -n "$lan" link add lan0 type veth peer name eth0 netns "$node"
  ip -n "$lan" addr add 10.79.0.1/24 dev lan0 && ip -n "$lan" link set lan0 up
  ip -n "$node" addr add 10.79.0.11/24 dev eth0 && ip -n "$node" link set eth0 up
  ip -n "$node" route add default via 10.79.0.1
  cat >"$dir/manifests/network.yaml" <<EOF
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: $net}
spec:
  mode: NAT
  subnets: [10.79.128.0/17, "fd79::/64"]
  ipam: {nodeBlockPrefix: 24}
  # Limits and (below) the agent's per-workload counters: the kernel learns per-address state
  # from the workloads' traffic, which must leave with them (the footprint checks); shaping
  # gives every workload an IFB link, which must leave with it too.
  limits: {newConnectionsPerSecond: 1000, maxConnections: 5000, conntrackEntries: 20000, ingressBandwidth: 1G, egressBandwidth: 1G}
EOF
  node_mounts || return 1
  start_agent
}

# The node's mount namespace: the CNI directories runtimes read at fixed paths (/etc/cni/net.d,
# /opt/cni/bin; ctr knows no other) and libcni's cache (/var/lib/cni) are the node's own there.
# Every client runs in it and in the node's network namespace (the plugin creates the host end of
# a workload's veth in the namespace it runs in).
node_paths=(/etc/cni/net.d /opt/cni/bin /var/lib/cni)
node_mounts() {
  local p q
  for p in "${node_paths[@]}"; do
    q=$p
    until [ -d "$q" ]; do echo "$q" >>"$dir/created"; q=$(dirname "$q"); done
    mkdir -p "$p" "$dir/fs$p"
  done
  cat >"$dir/node-init.sh" <<EOF
#!/usr/bin/env bash
set -e
for p in ${node_paths[*]}; do mount --bind "$dir/fs\$p" "\$p"; done
echo \$\$ >"$dir/node.pid"
exec sleep infinity
EOF
  chmod +x "$dir/node-init.sh"
  unshare -m --propagation slave nsenter --net="/run/netns/$node" -- "$dir/node-init.sh" &
  eventually 10 "the node's mount namespace" test -s "$dir/node.pid"
}
conf_dir=$dir/fs/etc/cni/net.d
bin_dir=$dir/fs/opt/cni/bin

agent_pid() { cat "$dir/agent.pid" 2>/dev/null; }
start_agent() {
  WEFT_LOG=info "$profile_dir/weft-operator" agent --netns "/run/netns/$node" --node-name n1 \
    --nodes n1 --manifests "$dir/manifests" --state-dir "$dir/state" --socket "$dir/run/agent.sock" \
    --cni-bin-dir "$bin_dir" --cni-conf-dir "$conf_dir" --cni-binary "$plugin" \
    --audit-log "$dir/audit.log" --workload-metrics >>"$dir/agent.log" 2>&1 &
  echo $! >"$dir/agent.pid"
  eventually 30 "agent up: conflist written, network realized" agent_ready
}
stop_agent() {
  local p; p=$(agent_pid) || return 0
  [ -n "$p" ] || return 0
  kill "$p" 2>/dev/null && while kill -0 "$p" 2>/dev/null; do sleep 0.1; done
  rm -f "$dir/agent.pid"
}
agent_ready() {
  [ -f "$conf_dir/10-weft.conflist" ] && [ -S "$dir/run/agent.sock" ] &&
    ip -n "$node" link show | grep -q ': wn-' && cnictl v1.3.0 status
}

# The node's locations, as the runtime's environment passes them to the plugin.
node_env=(env WEFT_STATE_DIR="$dir/state" WEFT_AGENT_SOCKET="$dir/run/agent.sock" WEFT_LOG_FILE="$dir/weft-cni.log")
in_node() { nsenter -t "$(cat "$dir/node.pid")" -m -n -- "${node_env[@]}" "$@"; }
cnictl() { # version args...
  local v=$1; shift
  in_node "$cache/cnictl-$v" -network weft -cache-dir "${CNI_CACHE:-/var/lib/cni/$v}" "$@"
}

# What a workload leaves on the node: weft host links (host ports `wf…`) and shaping links in use
# (IFBs with a port's alias; those of departed ports are kept as spares, at most 64, and taken by
# the next ports shaped), allocations in the IPAM store, nftables set and map elements, and the
# agent's open descriptors.
host_links() { ip -n "$node" -o link show | grep -c ': wf'; }
shaping_links() { ip -n "$node" -o link show type ifb | grep -c 'alias weft:shape:'; }
spare_links() { ip -n "$node" -o link show type ifb | grep -c 'alias weft:shape-spare'; }
allocations() { cat "$dir"/state/ipam/*/allocations.json 2>/dev/null | grep -oE '"(container_id|containerId)"' | wc -l; }
nft_elements() { ip netns exec "$node" nft -j list ruleset | python3 -c '
import json, sys
n = 0
for o in json.load(sys.stdin)["nftables"]:
    for k in ("set", "map"):
        if k in o and o[k]["table"].startswith("weft"):
            n += len(o[k].get("elem", []))
print(n)'; }
agent_fds() { ls "/proc/$(agent_pid)/fd" | wc -l; }
footprint() { echo "links=$(host_links) ifbs=$(shaping_links) allocations=$(allocations) elements=$(nft_elements) fds=$(agent_fds)"; }
footprint_is() { [ "$(footprint)" = "$1" ]; }
no_host_links() { [ "$(host_links)" = 0 ]; }
# The footprint settles back to BEFORE (descriptors of closed connections go a moment later).
settles_to() {
  eventually 10 "$2: nothing left behind ($1)" footprint_is "$1" || { log "now: $(footprint)"; return 1; }
}

ns_add() { ip netns add "$prefix-$1"; }
ns_del() { ip netns del "$prefix-$1" 2>/dev/null; }
ns_path() { echo "/run/netns/$prefix-$1"; }
# The workload's IPv4 address on eth0.
addr4_in() { ip -n "$prefix-$1" -4 -o addr show dev eth0 | awk '{ print $4 }' | cut -d/ -f1; }
pings_lan() { ip netns exec "$prefix-$1" ping -c1 -W2 10.79.0.1 >/dev/null; }

# ---------------------------------------------------------------------------------------------
# Tests

# libcni v1.1.2 (containerd 1.6/1.7, podman 4): the conflist's cniVersion is used, 1.0.0 results.
t_libcni112() {
  local before out; before=$(footprint)
  expect "libcni v1.1.2 uses the conflist's cniVersion 1.0.0" test "$(cnictl v1.1.2 version)" = 1.0.0 || return 1
  ns_add a || return 1
  out=$(cnictl v1.1.2 add c-a "$(ns_path a)") || { fail "ADD: $out"; ns_del a; return 1; }
  expect "ADD answers a 1.0.0 result" grep -q '"cniVersion": "1.0.0"' <<<"$out" &&
    expect "the workload has an address of the Network ($(addr4_in a))" grep -q '^10\.79\.' <<<"$(addr4_in a)" &&
    expect "the workload reaches the LAN through the node (masquerade)" pings_lan a &&
    expect "CHECK passes" cnictl v1.1.2 check c-a "$(ns_path a)" &&
    expect "DEL succeeds" cnictl v1.1.2 del c-a "$(ns_path a)" &&
    expect "a second DEL succeeds" cnictl v1.1.2 del c-a "$(ns_path a)" &&
    expect "GC is refused by libcni v1.1 itself" not cnictl v1.1.2 gc 2>/dev/null ||
    { ns_del a; return 1; }
  ns_del a
  settles_to "$before" "ADD/CHECK/DEL through libcni v1.1.2"
}

# libcni v1.3.0 picks 1.1.0 from cniVersions: GC with valid attachments, STATUS.
t_libcni13() {
  local before out; before=$(footprint)
  expect "libcni v1.3.0 picks 1.1.0 from cniVersions" test "$(cnictl v1.3.0 version)" = 1.1.0 || return 1
  expect "STATUS succeeds while the agent serves the node" cnictl v1.3.0 status || return 1
  ns_add b1 && ns_add b2 || return 1
  out=$(cnictl v1.3.0 add c-b1 "$(ns_path b1)") || { fail "ADD b1: $out"; return 1; }
  expect "ADD answers a 1.1.0 result" grep -q '"cniVersion": "1.1.0"' <<<"$out" || return 1
  cnictl v1.3.0 add c-b2 "$(ns_path b2)" >/dev/null || { fail "ADD b2"; return 1; }
  expect "CHECK passes" cnictl v1.3.0 check c-b1 "$(ns_path b1)" || return 1
  local two; two=$(footprint)
  # GC from a runtime whose cache lost both attachments: only the plugin's GC can clean up.
  CNI_CACHE=/var/lib/cni/empty expect "GC keeping c-b1/eth0 succeeds" cnictl v1.3.0 gc c-b1/eth0 || return 1
  expect "GC removed c-b2's host link and allocation" test "$(host_links)/$(allocations)" = "1/1" &&
    expect "GC left c-b1 working" pings_lan b1 &&
    expect "GC left c-b1 passing CHECK" cnictl v1.3.0 check c-b1 "$(ns_path b1)" &&
    expect "GC had removed something ($two)" test "$two" != "$(footprint)" || return 1
  # The agent down: STATUS fails with code 50 (kubelet then reports the node's network not ready).
  stop_agent
  out=$(cnictl v1.3.0 status 2>&1) && { fail "STATUS succeeded without the agent"; start_agent; return 1; }
  log "STATUS without the agent: $out"
  expect "STATUS without the agent fails with code 50, naming the agent" grep -q '^code 50: .*agent' <<<"$out"
  start_agent || return 1
  expect "STATUS succeeds again once the agent is back" cnictl v1.3.0 status || return 1
  expect "GC with no valid attachment removes c-b1 too" cnictl v1.3.0 gc &&
    expect "a DEL after GC succeeds" cnictl v1.3.0 del c-b1 "$(ns_path b1)" || return 1
  ns_del b1; ns_del b2
  settles_to "$before" "GC and DEL through libcni v1.3.0"
}

# A runtime that forgets the namespace at DEL (ctr passes an empty CNI_NETNS) leaves nothing.
t_del_without_netns() {
  local before; before=$(footprint)
  ns_add d || return 1
  cnictl v1.1.2 add c-d "$(ns_path d)" >/dev/null || { fail "ADD"; ns_del d; return 1; }
  ns_del d
  expect "DEL with an empty CNI_NETNS succeeds" cnictl v1.1.2 del c-d "" || return 1
  settles_to "$before" "DEL without the namespace"
}

# 20 start/stop cycles through libcni v1.3.0: no growth.
t_cycles() {
  local before i; ns_add cy || return 1
  cnictl v1.3.0 add c-cy-0 "$(ns_path cy)" >/dev/null && cnictl v1.3.0 del c-cy-0 "$(ns_path cy)" || return 1
  # DEL leaves the veth to the namespace's teardown; this namespace is kept, so the agent
  # deletes it after its grace period (5 s). Every later ADD into it finds the previous
  # attachment's interface there and removes it first.
  eventually 10 "the agent deletes the link of a DEL whose namespace the runtime kept" \
    no_host_links || return 1
  before=$(footprint)
  for ((i = 1; i <= cycles; i++)); do
    cnictl v1.3.0 add "c-cy-$i" "$(ns_path cy)" >/dev/null &&
      cnictl v1.3.0 del "c-cy-$i" "$(ns_path cy)" || { fail "cycle $i"; ns_del cy; return 1; }
  done
  ns_del cy
  settles_to "$before" "$cycles ADD/DEL cycles through libcni v1.3.0" || return 1
  # The cycles' egress limits took the spare shaping links of the attachments before them:
  # a handful of spares, not one link per cycle.
  local spares; spares=$(spare_links)
  expect "the departed attachments' shaping links were reused ($spares spares after $cycles cycles)" \
    test "$spares" -ge 1 -a "$spares" -le 4
}

# containerd 1.6 with a private root and state, in the node's namespaces; `ctr run --cni` reads the
# node's /etc/cni/net.d and /opt/cni/bin.
containerd_up() {
  local d=$dir/containerd
  mkdir -p "$d"/{root,state}
  cat >"$d/config.toml" <<EOF
version = 2
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$d/containerd.sock"
EOF
  in_node /usr/bin/containerd --config "$d/config.toml" >"$d/containerd.log" 2>&1 &
  eventually 30 "containerd 1.6 up" ctr_ version || return 1
  ctr_ images import "$dir/images/testbox.tar" >/dev/null
}
ctr_() { in_node /usr/bin/ctr -a "$dir/containerd/containerd.sock" -n weft "$@"; }

t_containerd() {
  [ -x /usr/bin/containerd ] || { fail "Debian's containerd is not installed"; return 1; }
  log "$(/usr/bin/containerd --version)"
  containerd_up || return 1
  local out before i
  # Before the first container: what it learned on the node (its ping) must go with it too.
  before=$(footprint)
  out=$(ctr_ run --rm --cni --snapshotter native weft.test/testbox:1 ctr-0 \
    sh -c 'ip -4 -o addr show dev eth0; ping -c1 -W2 10.79.0.1 >/dev/null && echo reached' 2>&1)
  log "ctr run: $out"
  expect "a container started by ctr run --cni has an address of the Network" grep -q 'inet 10\.79\.' <<<"$out" &&
    expect "it reaches the LAN" grep -q reached <<<"$out" || return 1
  for ((i = 1; i <= cycles; i++)); do
    ctr_ run --rm --cni --snapshotter native weft.test/testbox:1 "ctr-$i" \
      sh -c 'ip -4 -o addr show dev eth0 | grep -q "inet 10\.79\."' >/dev/null 2>&1 || { fail "cycle $i"; return 1; }
  done
  log "$cycles containers started and stopped"
  settles_to "$before" "$cycles ctr run --cni cycles"
}

# podman 4 with its CNI backend, a host port (-p: portMappings) reached from the LAN.
# Rootful podman raises a container's nofile and nproc limits, which runc cannot do where root
# lacks CAP_SYS_RESOURCE (as on this machine): every container asks for limits within the node's.
limits=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
podman_() {
  in_node CONTAINERS_CONF="$dir/podman/containers.conf" \
    CONTAINERS_STORAGE_CONF="$dir/podman/storage.conf" podman --root "$dir/podman/root" \
    --runroot "$dir/podman/run" --cgroup-manager cgroupfs --events-backend file "$@"
}
podman_up() {
  local d=$dir/podman
  mkdir -p "$d"/{root,run,tmp}
  cat >"$d/containers.conf" <<EOF
[network]
network_backend = "cni"
network_config_dir = "/etc/cni/net.d"
cni_plugin_dirs = ["/opt/cni/bin"]
default_network = "weft"
[engine]
# conmon runs \`podman container cleanup\` (the CNI DEL of a container that exits) with only these
# variables: the private configuration and the node's locations must reach it.
conmon_env_vars = ["PATH=$PATH", "CONTAINERS_CONF=$d/containers.conf", "CONTAINERS_STORAGE_CONF=$d/storage.conf", "WEFT_STATE_DIR=$dir/state", "WEFT_AGENT_SOCKET=$dir/run/agent.sock", "WEFT_LOG_FILE=$dir/weft-cni.log"]
tmp_dir = "$d/tmp"
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$d/events.log"
EOF
  cat >"$d/storage.conf" <<EOF
[storage]
driver = "vfs"
graphroot = "$d/root"
runroot = "$d/run"
EOF
  podman_ load -q -i "$dir/images/testbox.tar" >/dev/null
}
lan_get() { # port -> body
  ip netns exec "$lan" busybox sh -c "printf 'GET / HTTP/1.0\r\n\r\n' | busybox timeout 3 busybox nc 10.79.0.11 $1" 2>/dev/null |
    tr -d '\r' | sed '1,/^$/d'
}
lan_answers() { lan_get "$1" | grep -q .; }
podman_lists() { podman_ network ls --format '{{.Name}}' | grep -qx "$1"; }
t_podman() {
  log "$(podman --version)"
  podman_up || { fail "podman set-up"; return 1; }
  expect "podman lists weft's network" podman_lists weft || return 1
  local before i out; before=$(footprint)
  podman_ run "${limits[@]}" -d --name web --network weft -p 18080:80 weft.test/testbox:1 \
    sh -c 'mkdir -p /www && hostname >/www/index.html && exec httpd -f -p 80 -h /www' >/dev/null ||
    { fail "podman run"; return 1; }
  out=$(podman_ inspect web --format '{{.NetworkSettings.Networks.weft.IPAddress}}')
  expect "the container has an address of the Network ($out)" grep -q '^10\.79\.' <<<"$out" &&
    eventually 10 "its host port 18080 (podman -p) answers on the node's address from the LAN" \
      lan_answers 18080 || { podman_ rm -f -t 0 web >/dev/null; return 1; }
  podman_ rm -f -t 0 web >/dev/null || { fail "podman rm"; return 1; }
  expect "the host port is gone with the container" not lan_answers 18080 || return 1
  settles_to "$before" "podman run -p and rm"
  for ((i = 1; i <= 3; i++)); do
    podman_ run "${limits[@]}" --rm --network weft weft.test/testbox:1 true >/dev/null || { fail "podman cycle $i"; return 1; }
  done
  settles_to "$before" "podman run --rm cycles"
}

# ---------------------------------------------------------------------------------------------

main() {
  [ "$(id -u)" = 0 ] || { echo "e2e/clients/test.sh needs root" >&2; exit 1; }
  install_packages || exit 1
  build_cnictl || { echo "building cnictl failed" >&2; exit 1; }
  [ -x "$profile_dir/weft-operator" ] ||
    (cd "$repo" && cargo build --locked -p weft-operator >&2) || exit 1
  # The plugin static, as weft ships it (a debug build: the same code path, quicker to build).
  plugin=$("$repo/cni-plugin/static.sh" dev) || { echo "building the static plugin failed" >&2; exit 1; }
  teardown
  [ "${KEEP:-0}" = 1 ] || trap teardown EXIT
  "$repo/e2e/cluster/images.sh" "$dir/images" testbox >/dev/null 2>&1 || { echo "testbox image failed" >&2; exit 1; }
  setup_node || { dump_state; echo "the node did not come up" >&2; exit 1; }
  run libcni112 t_libcni112
  run libcni13 t_libcni13
  run del-without-netns t_del_without_netns
  run cycles t_cycles
  run containerd t_containerd
  run podman t_podman
  echo "clients: $passed passed, $failed failed${failures:+ (${failures[*]})}" >&2
  ((failed == 0))
}
main "$@"
