#!/usr/bin/env bash
# police-tcp.sh — one TCP stream (iperf3) through an egress limit, policed or shaped, the way
# weft enforces it, between two throw-away namespaces on a bridge in a third.
#
# usage: bench/police-tcp.sh [police|shape|none] [Mbit/s, default 100] [seconds, default 10]
#
#   police  the guard table's meter as weft writes it for `egressBandwidthMode: Police`: the
#           sender's bridge port in a set, a token bucket per port (`update @meter { iifname
#           limit rate over R bytes/second burst B bytes }`) in the bridge family's prerouting
#   shape   weft's default: the port's ingress redirected to an IFB link with a `tbf`
#   none    no limit
# The burst is weft's default: 20 ms of the rate, at least 32 KiB. Prints the stream's rate
# each second (the sender's), its mean as received and its retransmissions. Needs root, iproute2,
# nftables and iperf3; removes its namespaces on exit.
set -euo pipefail
MODE=${1:-police}; R=${2:-100}; T=${3:-10}
ID=$$; B=wpt$ID-node; A=wpt$ID-a; S=wpt$ID-s
cleanup() { for n in "$B" "$A" "$S"; do ip netns del "$n" 2>/dev/null || true; done; }
trap cleanup EXIT
for n in "$B" "$A" "$S"; do ip netns add "$n"; done
ip -n "$B" link add br0 type bridge; ip -n "$B" link set br0 up
ip -n "$B" link add wfa type veth peer name eth0 netns "$A"
ip -n "$B" link add wfs type veth peer name eth0 netns "$S"
for p in wfa wfs; do ip -n "$B" link set "$p" master br0 up; done
ip -n "$A" addr add 10.9.0.2/24 dev eth0; ip -n "$A" link set eth0 up
ip -n "$S" addr add 10.9.0.3/24 dev eth0; ip -n "$S" link set eth0 up
BYTES=$((R * 1000000 / 8)); BURST=$((BYTES / 50)); [ "$BURST" -ge 32768 ] || BURST=32768
case "$MODE" in
  police)
    ip netns exec "$B" nft -f - <<NFT
table bridge weft {
  set bw { type ifname; elements = { "wfa" } }
  set bwm { type ifname; flags dynamic,timeout; }
  chain prerouting { type filter hook prerouting priority filter; policy accept;
    iifname @bw update @bwm { iifname timeout 60s limit rate over $BYTES bytes/second burst $BURST bytes } drop
  }
}
NFT
    ;;
  shape)
    ip -n "$B" link add ifb0 type ifb; ip -n "$B" link set ifb0 up
    tc -n "$B" qdisc add dev ifb0 root tbf rate "${R}mbit" burst "$BURST" latency 25ms
    tc -n "$B" qdisc add dev wfa clsact
    tc -n "$B" filter add dev wfa ingress u32 match u32 0 0 action mirred egress redirect dev ifb0
    ;;
  none) ;;
  *) echo "usage: $0 [police|shape|none] [Mbit/s] [seconds]" >&2; exit 2;;
esac
ip netns exec "$S" iperf3 -s -D -1 >/dev/null
sleep 0.3
ip netns exec "$A" iperf3 -c 10.9.0.3 -t "$T" -J | python3 -c '
import json, sys
d = json.load(sys.stdin); e = d["end"]
print("%s %s Mbit/s: per second %s | received %.1f Mbit/s, %d retransmissions" % (
    sys.argv[1], sys.argv[2],
    " ".join("%.0f" % (i["sum"]["bits_per_second"] / 1e6) for i in d["intervals"]),
    e["sum_received"]["bits_per_second"] / 1e6, e["sum_sent"].get("retransmits", 0)))' "$MODE" "$R"
