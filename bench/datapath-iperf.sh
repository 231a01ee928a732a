#!/usr/bin/env bash
# datapath-iperf.sh — iperf3 (one TCP stream, one UDP stream) and ping latency through weft's
# datapaths, against a bare veth pair.
#
# usage: bench/datapath-iperf.sh [-t SECONDS] [-r REPS] [--no-udp] [--no-ping] [--udp-rate RATE]
#   defaults: -t 5 -r 3; the median of the reps is reported.
#   UDP: iperf3 -u -l 1400 (datagrams that fit the 1500 MTU, no fragments), -t SECONDS. By default
#        -b 0, as fast as the sender can: the received Gbit/s is then the path's packet-rate
#        capacity (UDP has no GSO here, so every 1400-byte datagram crosses the path on its own),
#        and the loss % is mostly the sender outrunning the receiving socket, not the path
#        dropping. --udp-rate RATE (iperf3 -b, e.g. 1G) offers a fixed rate instead, for loss at
#        that load.
#   ping: ping -c 200 -i 0.01 (2 s), round-trip time avg and p99 in ms from the 200 replies.
#   --no-udp / --no-ping leave them out (TCP alone is the script's original run).
#
# Builds bench/confs/datapath.yaml with `weft-lab --keep` (the real agent and `weft` CNI;
# debug build from `cargo build --workspace`, or WEFT_BIN_DIR), no policies, and measures:
#   veth        a bare veth pair between two namespaces made here (the baseline)
#   linux-br    two namespaces on a plain Linux bridge in a third, made here: no nftables,
#               bridge-nf-call-iptables=0 (the kernel's floor for any bridged pod path: two veths)
#   bridge      two pods on node-a's Bridge network (pod veth -> node bridge -> pod veth)
#   bridge-x    a pod on node-a to a pod on node-b, same Bridge network (through both uplinks)
#   egress-br   a Bridge-network pod to the outside host (bridged onto the LAN, unmasqueraded)
#   egress-nat  a NAT-network pod to the outside host (routed by the node and masqueraded)
#   veth-path-R `bridge` in the reverse direction (-R): the veth path the tap path compares with
#   tap-plain   pod -> VM guest on the same bridge, and the reverse: weft's veth end, the tc
#   tap-vnet    redirect to the VM's tap, a relay, the guest's tap. The relay stands in for the VMM
#               (a C program compiled here with gcc): `plain` copies one frame per read/write,
#               as the lab's stand-in does; `vnet` opens both taps with IFF_VNET_HDR and
#               TUN_F_CSUM|TSO4|TSO6, so 64 KiB GSO frames cross it, as QEMU's userspace
#               virtio-net backend does. A VMM with vhost-net moves frames in the kernel
#               instead, so both are lower bounds of the tap path, not of weft's part of it.
# Scenarios run round-robin (rep 1 of each, then rep 2, ..., each rep starting one scenario later)
# so that load from other processes spreads over all of them. Everything created here is
# removed on exit, also on failure.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 2; }
for b in iperf3 python3 nft gcc; do command -v $b >/dev/null || { echo "missing $b" >&2; exit 2; }; done
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${WEFT_BIN_DIR:-$ROOT/target/debug}"
LABFILE="$HERE/confs/datapath.yaml"
T=5; REPS=3; UDP=1; PING=1; UDP_RATE=0
while [ $# -gt 0 ]; do
  case "$1" in
    -t) T="$2"; shift 2;; -r) REPS="$2"; shift 2;;
    --no-udp) UDP=""; shift;; --no-ping) PING=""; shift;; --udp-rate) UDP_RATE="$2"; shift 2;;
    *) echo "unknown arg $1" >&2; exit 2;;
  esac
done
LAB="dpi$$"
VA="dpi$$-va"; VB="dpi$$-vb"; LBN="dpi$$-bn"; LB1="dpi$$-b1"; LB2="dpi$$-b2"
TMP="$(mktemp -d /tmp/weft-dpiperf.XXXXXX)"
RELAY_PID=""
LAB_UP=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$RELAY_PID" ] && { kill "$RELAY_PID" 2>/dev/null || true; wait "$RELAY_PID" 2>/dev/null || true; }
  for p in "$TMP"/*.pid; do
    [ -s "$p" ] && kill "$(cat "$p")" 2>/dev/null || true
  done
  [ -n "$LAB_UP" ] && { "$BIN/weft-lab" down "$LABFILE" --name "$LAB" >/dev/null 2>&1 || echo "warning: lab down $LAB failed" >&2; }
  for n in "$VA" "$VB" "$LBN" "$LB1" "$LB2"; do ip netns del "$n" 2>/dev/null || true; done
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- the VMM stand-in: relays frames between two taps (in two namespaces)
cat > "$TMP/relay.c" <<'C'
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
static int vnet;
static int open_tap(const char *ns, const char *name) {
  char p[256];
  snprintf(p, sizeof p, "/run/netns/%s", ns);
  int nfd = open(p, O_RDONLY);
  if (nfd < 0 || setns(nfd, CLONE_NEWNET)) { perror(p); exit(1); }
  close(nfd);
  int fd = open("/dev/net/tun", O_RDWR);
  if (fd < 0) { perror("/dev/net/tun"); exit(1); }
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | (vnet ? IFF_VNET_HDR : 0);
  strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
  if (ioctl(fd, TUNSETIFF, &ifr)) { perror(name); exit(1); }
  /* Offloads stay set on a persistent tap after its reader leaves: set them every time (none
   * without a vnet header, or the kernel would hand over unchecksummed GSO frames). */
  int sz = 12; /* struct virtio_net_hdr_mrg_rxbuf, as virtio-net 1.0 */
  if ((vnet && ioctl(fd, TUNSETVNETHDRSZ, &sz)) ||
      ioctl(fd, TUNSETOFFLOAD, vnet ? TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 : 0)) { perror("offload"); exit(1); }
  return fd;
}
struct dir { int from, to; };
static void *pump(void *arg) {
  struct dir *d = arg;
  static __thread char buf[65536 + 64];
  for (;;) {
    ssize_t n = read(d->from, buf, sizeof buf);
    if (n <= 0) return 0;
    (void)!write(d->to, buf, n); /* a frame the other side refuses is dropped, as a NIC would */
  }
}
int main(int argc, char **argv) {
  if (argc != 6) { fprintf(stderr, "usage: relay NS1 TAP1 NS2 TAP2 plain|vnet\n"); return 2; }
  vnet = !strcmp(argv[5], "vnet");
  int a = open_tap(argv[1], argv[2]), b = open_tap(argv[3], argv[4]);
  struct dir ab = {a, b}, ba = {b, a};
  pthread_t t;
  pthread_create(&t, 0, pump, &ab);
  pump(&ba);
  return 0;
}
C
gcc -O2 -Wall -pthread -o "$TMP/relay" "$TMP/relay.c"

# ---- the baseline: a bare veth pair
ip netns add "$VA"; ip netns add "$VB"
ip link add eth0 netns "$VA" type veth peer name eth0 netns "$VB"
ip -n "$VA" addr add 10.199.0.1/24 dev eth0; ip -n "$VB" addr add 10.199.0.2/24 dev eth0
for n in "$VA" "$VB"; do ip -n "$n" link set lo up; ip -n "$n" link set eth0 up; done
# ---- the floor of a bridged path: a plain Linux bridge, two veth ports
ip netns add "$LBN"; ip netns add "$LB1"; ip netns add "$LB2"
ip netns exec "$LBN" sysctl -qw net.bridge.bridge-nf-call-iptables=0 2>/dev/null || true
ip -n "$LBN" link add br0 type bridge; ip -n "$LBN" link set br0 up
for i in 1 2; do
  n="dpi$$-b$i"
  ip link add eth0 netns "$n" type veth peer name "p$i" netns "$LBN"
  ip -n "$LBN" link set "p$i" master br0; ip -n "$LBN" link set "p$i" up
  ip -n "$n" addr add "10.199.1.$i/24" dev eth0; ip -n "$n" link set lo up; ip -n "$n" link set eth0 up
done

# ---- weft: the lab (its expectations check the wiring before anything is measured)
LAB_UP=1
if ! "$BIN/weft-lab" "$LABFILE" --keep --name "$LAB" > "$TMP/lab.out" 2>&1; then
  cat "$TMP/lab.out" >&2; echo "lab failed" >&2; exit 1
fi
ns() { echo "wl-$LAB-$1"; }
addr() { ip -n "$(ns "$1")" -4 -o addr show dev "${2:-eth0}" | awk '{print $4}' | cut -d/ -f1 | head -1; }
OUTSIDE=$(ip -n "$(ns lan-0)" -4 -o addr show dev lan0 | awk '{print $4}' | cut -d/ -f1 | head -1)
A1=$(addr w-br-a1); XB1=$(addr w-br-b1); VM=$(addr g-vm-a)
TAP=$(ip -n "$(ns w-vm-a)" -o link show type tun | awk -F': ' '{print $2}' | head -1)

# One iperf3 server per server namespace for the whole run.
for n in "$VA" "$LB1" "$(ns w-br-a1)" "$(ns w-br-b1)" "$(ns lan-0)" "$(ns g-vm-a)"; do
  ip netns exec "$n" iperf3 -s -D -I "$TMP/$n.pid" >/dev/null
done
sleep 0.5

relay() { # plain|vnet|off
  if [ -n "$RELAY_PID" ]; then kill "$RELAY_PID" 2>/dev/null || true; wait "$RELAY_PID" 2>/dev/null || true; RELAY_PID=""; fi
  [ "$1" = off ] && return
  "$TMP/relay" "$(ns w-vm-a)" "$TAP" "$(ns g-vm-a)" eth0 "$1" & RELAY_PID=$!
  sleep 0.5 # the taps get carrier when the relay attaches; let ARP settle with one ping
  ip netns exec "$(ns w-br-a2)" ping -c 1 -W 2 "$VM" >/dev/null || echo "warning: VM $VM unreachable through the $1 relay" >&2
}

once() { # client-ns server-addr [iperf3 args...] -> Gbit/s (one retry: a server may still be busy)
  local c="$1" s="$2" try v; shift 2
  for try in 1 2; do
    timeout $((T + 20)) ip netns exec "$c" iperf3 -c "$s" -t "$T" --connect-timeout 3000 -J "$@" > "$TMP/ip.json" 2>&1 || true
    if v=$(python3 -c 'import json,sys; print("%.2f" % (json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"]/1e9))' "$TMP/ip.json" 2>/dev/null); then
      echo "$v"; return
    fi
    echo "iperf3 $c -> $s $* (try $try) failed: $(grep -m1 '"error"' "$TMP/ip.json" || head -c 200 "$TMP/ip.json")" >&2
    sleep 1
  done # nothing recorded: the median is of the runs that completed
}

udp() { # client-ns server-addr [iperf3 args...] -> "Gbit/s-received loss-%" (one retry)
  local c="$1" s="$2" try v; shift 2
  for try in 1 2; do
    timeout $((T + 20)) ip netns exec "$c" iperf3 -c "$s" -u -b "$UDP_RATE" -l 1400 -t "$T" --connect-timeout 3000 -J "$@" > "$TMP/ip.json" 2>&1 || true
    if v=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["end"]["sum_received"]; print("%.2f/%.1f" % (r["bits_per_second"]/1e9, r["lost_percent"]))' "$TMP/ip.json" 2>/dev/null); then
      echo "$v"; return
    fi
    echo "iperf3 -u $c -> $s $* (try $try) failed: $(grep -m1 '"error"' "$TMP/ip.json" || head -c 200 "$TMP/ip.json")" >&2
    sleep 1
  done
}

rtt() { # client-ns server-addr -> "avg/p99" in ms over 200 echo requests 10 ms apart
  ip netns exec "$1" ping -n -c 200 -i 0.01 -W 1 "$2" 2>/dev/null |
    python3 -c '
import re, statistics, sys
t = sorted(float(m.group(1)) for m in re.finditer(r"time=([0-9.]+) ms", sys.stdin.read()))
if len(t) >= 100:
    print("%.3f/%.3f" % (statistics.mean(t), t[min(len(t) - 1, int(len(t) * 0.99))]))
else:
    sys.stderr.write("ping: %d replies of 200\n" % len(t))' || true
}

declare -A V U P
ORDER=(veth linux-br bridge bridge-x egress-br egress-nat veth-path-R tap-plain tap-plain-R tap-vnet tap-vnet-R)
three() { # scenario client-ns server-addr [-R]: TCP, then UDP and ping as asked
  local k="$1" c="$2" s="$3"; shift 3
  V[$k]+=" $(once "$c" "$s" "$@")"
  [ -n "$UDP" ] && U[$k]+=" $(udp "$c" "$s" "$@")"
  # A round trip has no direction: the reverse rows have the forward rows' ping.
  [ -n "$PING" ] && [ $# -eq 0 ] && P[$k]+=" $(rtt "$c" "$s")"
  return 0
}
unit() { # one measurement unit (a tap unit measures both directions through one relay)
  case "$1" in
    veth) three veth "$VB" 10.199.0.1;;
    linux-br) three linux-br "$LB2" 10.199.1.1;;
    bridge) three bridge "$(ns w-br-a2)" "$A1";;
    bridge-x) three bridge-x "$(ns w-br-a2)" "$XB1";;
    egress-br) three egress-br "$(ns w-br-a2)" "$OUTSIDE";;
    egress-nat) three egress-nat "$(ns w-nat-a1)" "$OUTSIDE";;
    veth-path-R) three veth-path-R "$(ns w-br-a2)" "$A1" -R;;
    tap-plain|tap-vnet)
      relay "${1#tap-}"
      three "$1" "$(ns w-br-a2)" "$VM"
      three "$1-R" "$(ns w-br-a2)" "$VM" -R
      relay off;;
  esac
}
UNITS=(veth linux-br bridge bridge-x egress-br egress-nat veth-path-R tap-plain tap-vnet)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq 1 "$REPS"); do
  # Each rep starts one unit later, so no scenario always runs first (after the relay changes).
  for i in $(seq 0 $((${#UNITS[@]} - 1))); do
    unit "${UNITS[$(( (i + r - 1) % ${#UNITS[@]} ))]}"
  done
  echo "rep $r/$REPS done" >&2
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

med() { python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print("%.2f" % statistics.median(v) if v else 0)' "$@"; }
declare -A M
for k in "${ORDER[@]}"; do
  # shellcheck disable=SC2086
  M[$k]=$(med ${V[$k]})
done
pct() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print('%.0f' % (a/b*100) if b else 'n/a')" "$1" "$2"; }

rules() { # namespace table -> rule count (lines inside chains that are not the hook line)
  ip netns exec "$1" nft list table "$2" weft 2>/dev/null |
    awk '/^\tchain /{c=1; next} c && /^\t}/{c=0} c && NF && $1 != "type" {n++} END {print n+0}'
}
NA=$(ns n-node-a)
echo "# weft datapath throughput: iperf3 1 TCP stream, -t $T, median of $REPS (all runs in brackets)"
echo "# kernel $(uname -r), $(nproc) CPUs, load average before $LOAD0, after $LOAD1; MTU 1500 everywhere"
echo "# policies: $(grep -cE '^\s*kind: (Cluster)?SegmentationPolicy' "$LABFILE" || true) in the lab; node-a: inet weft $(rules "$NA" inet) rules, bridge weft $(rules "$NA" bridge) rules, br_netfilter calls on weft's bridges (their own, whatever the node-wide switch): $(ip -n "$NA" -d link show type bridge 2>/dev/null | grep -oE 'nf_call_iptables [01]' | sort | uniq -c | tr -s ' ' | paste -sd, - || echo n/a)"
printf '%-12s %8s  %s\n' scenario Gbit/s runs
for k in "${ORDER[@]}"; do printf '%-12s %8s  [%s ]\n' "$k" "${M[$k]}" "${V[$k]}"; done
echo
echo "bridge (same node) / veth pair:      $(pct "${M[bridge]}" "${M[veth]}") %   (target >= 95 %)"
echo "bridge (same node) / Linux bridge:   $(pct "${M[bridge]}" "${M[linux-br]}") %"
echo "bridge (two nodes) / veth pair:      $(pct "${M[bridge-x]}" "${M[veth]}") %"
echo "NAT egress / bridge egress:          $(pct "${M[egress-nat]}" "${M[egress-br]}") %   (target >= 90 %)"
echo "tap path (plain relay) / veth path:  $(pct "${M[tap-plain]}" "${M[bridge]}") % to the VM, $(pct "${M[tap-plain-R]}" "${M[veth-path-R]}") % from it"
echo "tap path (vnet relay) / veth path:   $(pct "${M[tap-vnet]}" "${M[bridge]}") % to the VM, $(pct "${M[tap-vnet-R]}" "${M[veth-path-R]}") % from it"

# ---- UDP and ping, the same scenarios and runs
medp() { # "a/b" pairs -> "median-a median-b" (the medians of each part)
  python3 -c '
import statistics, sys
v = [tuple(float(y) for y in x.split("/")) for x in sys.argv[2:]]
f = sys.argv[1].split(",")
print(" ".join(f[i] % statistics.median(p[i] for p in v) for i in range(len(f))) if v else " ".join("n/a" for _ in f))' "$@"
}
if [ -n "$UDP" ]; then
  declare -A MU
  echo
  if [ "$UDP_RATE" = 0 ]; then
    echo "# UDP: iperf3 -u -b 0 -l 1400 (as fast as the sender can), -t $T, median of $REPS; received Gbit/s, and the loss % (mostly the sender outrunning the receiver)"
  else
    echo "# UDP: iperf3 -u -b $UDP_RATE -l 1400, -t $T, median of $REPS; received Gbit/s and loss %"
  fi
  printf '%-12s %8s %7s  %s\n' scenario Gbit/s loss% 'runs (Gbit/s/loss%)'
  for k in "${ORDER[@]}"; do
    # shellcheck disable=SC2086
    read -r g l <<< "$(medp '%.2f,%.1f' ${U[$k]:-})"
    MU[$k]=$g
    printf '%-12s %8s %7s  [%s ]\n' "$k" "$g" "$l" "${U[$k]:-}"
  done
  echo
  echo "UDP bridge (same node) / veth pair:  $(pct "${MU[bridge]}" "${MU[veth]}") %"
  echo "UDP NAT egress / bridge egress:      $(pct "${MU[egress-nat]}" "${MU[egress-br]}") %"
  echo "UDP tap path / veth path (plain, vnet relay): $(pct "${MU[tap-plain]}" "${MU[bridge]}") %, $(pct "${MU[tap-vnet]}" "${MU[bridge]}") % to the VM"
fi
if [ -n "$PING" ]; then
  echo
  echo "# ping: -c 200 -i 0.01, round-trip time in ms, median of $REPS runs of: the average, the 99th percentile (the reverse rows: see the forward rows)"
  printf '%-12s %8s %8s  %s\n' scenario avg p99 'runs (avg/p99)'
  for k in "${ORDER[@]}"; do
    [ -n "${P[$k]:-}" ] || continue
    # shellcheck disable=SC2086
    read -r a q <<< "$(medp '%.3f,%.3f' ${P[$k]})"
    printf '%-12s %8s %8s  [%s ]\n' "$k" "$a" "$q" "${P[$k]}"
  done
fi
