#!/usr/bin/env bash
# A real Kubernetes cluster on one machine, in network namespaces of its own:
#
#   weftc-lan    the LAN: bridge lan0 (10.77.0.1/24, fd77::1/64), the LAN's router and the
#                "outside" host, and the control plane (etcd, kube-apiserver on 10.77.0.1:6443,
#                kube-controller-manager, kube-scheduler)
#   weftc-node1  node1: uplink eth0 10.77.0.11 on the LAN; containerd (CRI) and kubelet in a
#   weftc-node2  node2: uplink eth0 10.77.0.12     mount namespace of their own
#
# Binaries come from e2e/cluster/build.sh (pinned Go modules), images from images.sh.
#
#   cluster.sh up                  bring the cluster up (idempotent: down first)
#   cluster.sh down                stop everything and remove every link, file and cgroup it made
#   cluster.sh kubectl ARGS...     kubectl as cluster-admin (also: helm, crictl-node1, ...)
#   cluster.sh node N CMD...       run CMD in node N's network and mount namespaces
#   cluster.sh lan CMD...          run CMD in the LAN namespace (the outside host)
#   cluster.sh load-images         (re)build and import the images on every node
#
# State lives in $WEFT_CLUSTER_DIR (default /var/tmp/weft-cluster).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
dir=${WEFT_CLUSTER_DIR:-/var/tmp/weft-cluster}
# Prefix of the network namespaces and cgroups (two clusters can run side by side).
pfx=${WEFT_CLUSTER_PREFIX:-weftc}
etcd_dir=/dev/shm/weft-cluster-etcd-$pfx
nodes=(node1 node2)
lan_v4=10.77.0.1
lan_v6=fd77::1
node_ip() { case $1 in node1) echo 10.77.0.11 ;; node2) echo 10.77.0.12 ;; esac; }
node_ip6() { case $1 in node1) echo fd77::11 ;; node2) echo fd77::12 ;; esac; }
api=https://$lan_v4:6443

log() { printf '[cluster %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

bin() {
  if [ -z "${BIN:-}" ]; then
    if [ -f "$dir/bin" ]; then BIN=$(cat "$dir/bin"); else BIN=$("$here/build.sh" | tail -1); fi
  fi
  echo "$BIN"
}

in_lan() { ip netns exec ${pfx}-lan "$@"; }
node_pid() { cat "$dir/$1/init.pid"; }
in_node() { local n=$1; shift; nsenter -t "$(node_pid "$n")" -m -n -- "$@"; }

kc() { in_lan "$(bin)/kubectl" --kubeconfig "$dir/pki/admin.kubeconfig" "$@"; }
hm() { in_lan env HOME="$dir/helm-home" "$(bin)/helm" --kubeconfig "$dir/pki/admin.kubeconfig" "$@"; }

# ---------------------------------------------------------------- certificates and kubeconfigs
# shellcheck source=pki.sh
. "$here/pki.sh"
pki() {
  local p=$dir/pki
  mkdir -p "$p"
  cd "$p"
  pki_ca weft-e2e-ca
  pki_cert apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:$lan_v4,IP:10.96.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth"
  pki_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth"
  pki_cert admin "/O=system:masters/CN=weft-e2e-admin" "extendedKeyUsage=clientAuth"
  pki_cert kcm "/CN=system:kube-controller-manager" "extendedKeyUsage=clientAuth"
  pki_cert scheduler "/CN=system:kube-scheduler" "extendedKeyUsage=clientAuth"
  for n in "${nodes[@]}"; do
    pki_cert "$n" "/O=system:nodes/CN=system:node:$n" "extendedKeyUsage=clientAuth"
  done
  for c in admin kcm scheduler "${nodes[@]}"; do
    pki_kubeconfig "$c" "$api" weft-e2e
  done
  cd - >/dev/null
}

# ---------------------------------------------------------------- the LAN and the control plane
start_bg() { # logfile cmd...  (in the LAN namespace, detached; pid appended to $dir/pids)
  local logf=$1; shift
  setsid ip netns exec ${pfx}-lan "$@" >"$logf" 2>&1 </dev/null &
  echo $! >>"$dir/pids"
}

wait_for() { # seconds description command...
  local t=$1 what=$2; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || die "timed out after ${t}s waiting for $what"
    sleep 0.5
  done
}

lan_up() {
  ip netns add ${pfx}-lan
  in_lan ip link set lo up
  in_lan ip link add lan0 type bridge
  in_lan ip addr add $lan_v4/24 dev lan0
  in_lan ip addr add $lan_v6/64 dev lan0 nodad
  in_lan ip link set lan0 up
  in_lan sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
}

control_plane_up() {
  local b; b=$(bin)
  local p=$dir/pki
  rm -rf "$etcd_dir"
  start_bg "$dir/etcd.log" etcd --name weftc --data-dir "$etcd_dir" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster weftc=http://127.0.0.1:2380
  start_bg "$dir/kube-apiserver.log" "$b/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 --bind-address=0.0.0.0 --secure-port=6443 \
    --advertise-address=$lan_v4 --service-cluster-ip-range=10.96.0.0/16 \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true --client-ca-file="$p/ca.crt" \
    --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" \
    --kubelet-client-certificate="$p/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$p/apiserver-kubelet-client.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$p/sa.pub" --service-account-signing-key-file="$p/sa.key" \
    --kubelet-preferred-address-types=InternalIP --profiling=false
  wait_for 120 "kube-apiserver /readyz" kc get --raw /readyz
  start_bg "$dir/kube-controller-manager.log" "$b/kube-controller-manager" \
    --kubeconfig="$p/kcm.kubeconfig" --authentication-kubeconfig="$p/kcm.kubeconfig" \
    --authorization-kubeconfig="$p/kcm.kubeconfig" --bind-address=127.0.0.1 --leader-elect=false \
    --service-account-private-key-file="$p/sa.key" --root-ca-file="$p/ca.crt" \
    --use-service-account-credentials=true --allocate-node-cidrs=false \
    --node-monitor-grace-period=20s --profiling=false
  start_bg "$dir/kube-scheduler.log" "$b/kube-scheduler" \
    --kubeconfig="$p/scheduler.kubeconfig" --authentication-kubeconfig="$p/scheduler.kubeconfig" \
    --authorization-kubeconfig="$p/scheduler.kubeconfig" --bind-address=127.0.0.1 \
    --leader-elect=false --profiling=false
  wait_for 60 "the default service account" kc -n default get serviceaccount default
}

# ---------------------------------------------------------------- nodes
# Paths kubelet, containerd, the CNI and weft write to: private per node (bind mounts in the
# node's mount namespace). Mount points missing on the machine are created and removed at down.
node_paths=(/var/lib/kubelet /var/lib/containerd /var/lib/cni /var/lib/weft /var/log/pods
  /var/log/containers /etc/cni/net.d /opt/cni/bin)
cgroup_controllers() { for c in /sys/fs/cgroup/*/; do c=${c%/}; [ -e "$c/cgroup.procs" ] && echo "$c"; done; }

node_up() {
  local n=$1 b; b=$(bin)
  local d=$dir/$n ip; ip=$(node_ip "$n")
  mkdir -p "$d"
  ip netns add "${pfx}-$n"
  ip link add "${pfx}-$n" type veth peer name eth0 netns "${pfx}-$n"
  ip link set "${pfx}-$n" netns ${pfx}-lan
  in_lan ip link set "${pfx}-$n" master lan0 up
  ip netns exec "${pfx}-$n" sh -ec "
    ip link set lo up
    ip addr add $ip/24 dev eth0
    ip addr add $(node_ip6 "$n")/64 dev eth0 nodad
    ip link set eth0 up
    ip route add default via $lan_v4
    ip -6 route add default via $lan_v6
    sysctl -qw net.ipv4.ip_forward=1"
  for c in $(cgroup_controllers); do mkdir -p "$c/${pfx}-$n"; done
  for p in "${node_paths[@]}"; do
    local q=$p missing=()
    while [ ! -e "$q" ]; do missing+=("$q"); q=$(dirname "$q"); done
    if ((${#missing[@]})); then
      mkdir -p "$p"
      printf '%s\n' "${missing[@]}" >>"$dir/created-dirs"
    fi
  done

  sed -e "s|@ROOT@|$d|g" -e "s|@BIN@|$b|g" "$here/containerd.toml" >"$d/containerd.toml"
  cat >"$d/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $dir/pki/ca.crt}
authorization: {mode: Webhook}
address: $ip
cgroupDriver: cgroupfs
cgroupRoot: /${pfx}-$n
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$d/containerd.sock
readOnlyPort: 0
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
syncFrequency: 10s
nodeStatusUpdateFrequency: 5s
EOF
  # The node's init: its own mount namespace in its network namespace.
  cat >"$d/init.sh" <<EOF
#!/usr/bin/env bash
set -e
mount --make-rprivate /
# sysfs of this network namespace, keeping the cgroup hierarchies.
mkdir -p $d/cg && mount --rbind /sys/fs/cgroup $d/cg
mount -t sysfs sysfs /sys && mount --move $d/cg /sys/fs/cgroup
# The machine's own /run/netns mounts (ip netns) would hide under the new /run and be found first
# by containerd's mount lookups: unmount them in this namespace.
umount -R -l /run/netns 2>/dev/null || true
mount -t tmpfs -o mode=755 tmpfs /run && mount --make-rshared /run
# Pod network namespaces are bind mounts here: shared, so that weft's agent (HostToContainer) sees them.
mkdir -p /run/netns && mount --bind /run/netns /run/netns && mount --make-shared /run/netns
for p in ${node_paths[*]}; do mkdir -p $d/fs\$p && mount --bind $d/fs\$p \$p; done
mount --make-rshared /var/lib/kubelet
echo \$\$ >$d/init.pid
$b/containerd --config $d/containerd.toml >$d/containerd.log 2>&1 &
sleep infinity
EOF
  chmod +x "$d/init.sh"
  rm -f "$d/init.pid"
  setsid nsenter --net="/run/netns/${pfx}-$n" unshare --mount --propagation private -- \
    "$d/init.sh" >"$d/init.log" 2>&1 </dev/null &
  wait_for 30 "$n's init" test -s "$d/init.pid"
  wait_for 60 "$n's containerd" in_node "$n" "$b/ctr" -a "$d/containerd.sock" version
  import_images "$n"
  in_node "$n" setsid "$b/kubelet" --config="$d/kubelet.yaml" --kubeconfig="$dir/pki/$n.kubeconfig" \
    --hostname-override="$n" --node-ip="$ip" --root-dir=/var/lib/kubelet \
    >"$d/kubelet.log" 2>&1 </dev/null &
  echo $! >"$d/kubelet.pid"
}

import_images() {
  local n=$1 b; b=$(bin)
  for i in "$dir"/images/*.tar; do
    in_node "$n" "$b/ctr" -a "$dir/$n/containerd.sock" -n k8s.io images import --local \
      --platform linux/amd64 "$i" 2>&1 >/dev/null | grep -v 'DEPRECATION: The support for cgroup v1' >&2 || true
  done
}

images() {
  mkdir -p "$dir/images"
  "$here/images.sh" "$dir/images"
}

# Wrappers that run kubectl and helm in the LAN namespace, for scripts that take a path.
wrappers() {
  mkdir -p "$dir/wrap"
  printf '#!/bin/sh\nexec ip netns exec %s-lan %s/kubectl "$@"\n' "$pfx" "$(bin)" >"$dir/wrap/kubectl"
  printf '#!/bin/sh\nexec ip netns exec %s-lan env HOME=%s/helm-home %s/helm "$@"\n' "$pfx" "$dir" "$(bin)" >"$dir/wrap/helm"
  chmod +x "$dir/wrap/kubectl" "$dir/wrap/helm"
}

# ---------------------------------------------------------------- up / down
up() {
  [ "$(id -u)" = 0 ] || die "the cluster needs root (network and mount namespaces, cgroups)"
  down >/dev/null 2>&1 || true
  # A new cluster starts from empty nodes (state of weft, kubelet and containerd included).
  for n in "${nodes[@]}"; do rm -rf "${dir:?}/$n"; done
  mkdir -p "$dir"
  : >"$dir/pids"
  rm -f "$dir/bin"
  BIN=$("$here/build.sh" | tail -1)
  echo "$BIN" >"$dir/bin"
  log "binaries: $(cat "$dir/bin")"
  images
  pki
  lan_up
  control_plane_up
  log "control plane ready at $api"
  for n in "${nodes[@]}"; do node_up "$n"; done
  for n in "${nodes[@]}"; do
    wait_for 120 "node $n registered" kc get node "$n"
  done
  wrappers
  log "cluster up: $(kc get nodes --no-headers | awk '{print $1"="$2}' | tr '\n' ' ')"
}

kill_tree_of_cgroup() { # cgroup name under every hierarchy
  local cg=$1 c
  for c in $(cgroup_controllers); do
    [ -d "$c/$cg" ] || continue
    find "$c/$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  done
}
rm_cgroup() {
  local cg=$1 c
  for c in $(cgroup_controllers); do
    [ -d "$c/$cg" ] && find "$c/$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

down() {
  local b=""; [ -f "$dir/bin" ] && b=$(cat "$dir/bin")
  for n in "${nodes[@]}"; do
    local d=$dir/$n
    if [ -s "$d/init.pid" ] && kill -0 "$(cat "$d/init.pid")" 2>/dev/null; then
      [ -s "$d/kubelet.pid" ] && kill "$(cat "$d/kubelet.pid")" 2>/dev/null || true
      # Stop the pods through the CRI so that CNI DEL runs for each.
      if [ -n "$b" ] && [ -x "$b/crictl" ]; then
        timeout 60 nsenter -t "$(cat "$d/init.pid")" -m -n -- "$b/crictl" \
          --runtime-endpoint "unix://$d/containerd.sock" rmp -fa >/dev/null 2>&1 || true
      fi
      # Every process of this node's mount namespace (containerd, shims, kubelet, init).
      local mnt; mnt=$(readlink "/proc/$(cat "$d/init.pid")/ns/mnt")
      for p in /proc/[0-9]*; do
        [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$mnt" ] && kill -9 "${p#/proc/}" 2>/dev/null
      done
    fi
    kill_tree_of_cgroup "${pfx}-$n"
  done
  # Shims whose node init was already gone (and so escaped the loop above).
  pkill -9 -f -- "-address $dir/" 2>/dev/null || true
  if [ -f "$dir/pids" ]; then
    while read -r pid; do
      [ -n "$pid" ] && pkill -9 -s "$pid" 2>/dev/null || true
    done <"$dir/pids"
  fi
  sleep 0.5
  for n in "${nodes[@]}"; do
    rm_cgroup "${pfx}-$n"
    ip netns del "${pfx}-$n" 2>/dev/null || true
  done
  ip netns del ${pfx}-lan 2>/dev/null || true
  if [ -f "$dir/created-dirs" ]; then
    # Deepest first.
    awk '{print length, $0}' "$dir/created-dirs" | sort -rn | cut -d' ' -f2- |
      while read -r p; do rmdir "$p" 2>/dev/null || true; done
  fi
  rm -rf "$etcd_dir"
  # Node file systems (container layers among them) are kept for inspection until the next up.
  rm -f "$dir/pids" "$dir/created-dirs"
}

cmd=${1:-}
shift || true
case "$cmd" in
  up) up ;;
  control-plane) # only the LAN and the control plane (no nodes, no images): for CRD and API checks
    down >/dev/null 2>&1 || true; mkdir -p "$dir"; : >"$dir/pids"
    rm -f "$dir/bin"; b=$(bin); echo "$b" >"$dir/bin"
    pki; lan_up; control_plane_up; wrappers; log "control plane ready at $api" ;;
  down) down ;;
  images) images ;;
  load-images) images; for n in "${nodes[@]}"; do import_images "$n"; done ;;
  kubectl) kc "$@" ;;
  helm) hm "$@" ;;
  node) n=$1; shift; in_node "$n" "$@" ;;
  lan) in_lan "$@" ;;
  crictl) n=$1; shift; in_node "$n" "$(bin)/crictl" --runtime-endpoint "unix://$dir/$n/containerd.sock" "$@" ;;
  env) echo "KUBECONFIG=$dir/pki/admin.kubeconfig"; echo "BIN=$(bin)" ;;
  *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
