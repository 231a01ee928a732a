# shellcheck shell=bash
# apiserver.sh — sourced by the benches that run weft against a real kube-apiserver
# (controller-api.sh, peers-scale.sh): etcd from Debian's etcd-server and the pinned API server
# and kubectl of e2e/cluster/build.sh, on 127.0.0.1 with ports of their own, their state under a
# temporary directory (etcd's on /dev/shm), all removed on exit. No kubelet, no scheduler.
#
# The caller sets ROOT (the repository) and calls:
#
# api_init NAME: builds (or finds) the cluster binaries ($KBIN), makes $TMP
#   (/tmp/weft-NAME.XXXXXX) and $ETCD_DIR, picks the ports ($ETCD_CLIENT, $ETCD_PEER, $API; the
#   caller may use $PORT_BASE + 3 to + 9), writes the admin kubeconfig ($KUBECONFIG, exported; the
#   API server's certificate is for IP 127.0.0.1 only) and sets the EXIT/INT/TERM trap: the
#   caller's `bench_cleanup` runs if it defines one, every PID of the PIDS array is stopped
#   (SIGTERM, 5 s, then SIGKILL), then $TMP and $ETCD_DIR are removed.
# api_start [API SERVER FLAGS...]: starts etcd and the API server, waits until it is ready and
#   creates the namespace weft-system. Their PIDs are $ETCD_PID and $API_PID (both in PIDS).
# api_crds DIR: applies the CRDs of DIR and waits until they are established.
# kc ARGS...: kubectl with the admin kubeconfig. log MESSAGE: a timestamped line on stderr.
# rss_mib PID: the process's resident memory in MiB (VmRSS), or "?" once it is gone.

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
kc() { "$KBIN/kubectl" "$@"; }
rss_mib() { awk '/^VmRSS/ {printf "%.0f", $2 / 1024; found = 1} END {if (!found) printf "?"}' "/proc/$1/status" 2>/dev/null || echo "?"; }

api_init() {
  command -v etcd >/dev/null || { echo "etcd missing: apt-get install etcd-server" >&2; exit 2; }
  KBIN=$("$ROOT/e2e/cluster/build.sh" | tail -1)
  TMP=$(mktemp -d "/tmp/weft-$1.XXXXXX")
  ETCD_DIR=$(mktemp -d "/dev/shm/weft-$1-etcd.XXXXXX")
  PIDS=()
  trap api_cleanup EXIT
  trap 'exit 130' INT TERM
  # Ports of this run (a second run beside it picks others).
  PORT_BASE=$((20000 + RANDOM % 20000))
  ETCD_CLIENT=$PORT_BASE ETCD_PEER=$((PORT_BASE + 1)) API=$((PORT_BASE + 2))
  # shellcheck source=../../e2e/cluster/pki.sh
  . "$ROOT/e2e/cluster/pki.sh"
  (
    cd "$TMP" || exit 1
    pki_ca weft-bench-ca
    pki_cert apiserver "/CN=kube-apiserver" "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"
    pki_cert admin "/O=system:masters/CN=weft-bench-admin" "extendedKeyUsage=clientAuth"
    pki_kubeconfig admin "https://127.0.0.1:$API" bench
  )
  export KUBECONFIG=$TMP/admin.kubeconfig
}

api_alive() { # is any of PIDS still running?
  local p
  for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done
  return 1
}

api_cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  if declare -F bench_cleanup >/dev/null; then bench_cleanup || true; fi
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  # The API server drains for a while on SIGTERM: it gets 5 s.
  for _ in $(seq 1 10); do
    api_alive || break
    sleep 0.5
  done
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP" "$ETCD_DIR"
  exit "$rc"
}

api_start() {
  etcd --name bench --data-dir "$ETCD_DIR" \
    --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT" --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "bench=http://127.0.0.1:$ETCD_PEER" --quota-backend-bytes=$((4 << 30)) \
    >"$TMP/etcd.log" 2>&1 &
  ETCD_PID=$!
  PIDS+=("$ETCD_PID")
  "$KBIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_CLIENT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API" \
    --service-cluster-ip-range=10.96.0.0/16 --authorization-mode=RBAC \
    --client-ca-file="$TMP/ca.crt" --tls-cert-file="$TMP/apiserver.crt" --tls-private-key-file="$TMP/apiserver.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$TMP/sa.pub" --service-account-signing-key-file="$TMP/sa.key" \
    --profiling=false "$@" >"$TMP/apiserver.log" 2>&1 &
  API_PID=$!
  PIDS+=("$API_PID")
  for _ in $(seq 1 240); do kc get --raw /readyz >/dev/null 2>&1 && break; sleep 0.5; done
  kc get --raw /readyz >/dev/null || { tail -20 "$TMP/apiserver.log" >&2; echo "the API server did not start" >&2; exit 1; }
  kc create namespace weft-system >/dev/null
}

api_crds() {
  [ -d "$1" ] || { echo "no CRD directory $1" >&2; exit 2; }
  kc apply -f "$1" >/dev/null
  kc wait --for condition=established --timeout=60s crd --all >/dev/null
}
