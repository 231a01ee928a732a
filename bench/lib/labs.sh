# labs.sh — sourced by the benches that build labs with `weft-lab --keep` and run iperf3 between
# a lab's `client` and `server` workloads (policy-iperf.sh, mirror-iperf.sh). The caller sets
# BIN (where weft-lab is), TMP (its temporary directory), LABS (the lab files), NAMES (the labs'
# names), T (seconds per iperf3 run), REPS and UDP (non-empty: UDP runs too).
#
# labs_down: kills the processes whose PIDs are in "$TMP"/*.pid (iperf3 servers), removes every
#   lab of LABS with `$BIN/weft-lab down` and removes $TMP; for the caller's EXIT trap.
# iperf_servers: an iperf3 server in each lab's `server` workload.
# iperf_once LAB [iperf3 args]: one run from the lab's client to its server; Gbit/s received
#   (one retry).
# iperf_reps: REPS rounds of a TCP run (and a UDP one, `-u -b 0 -l 1400`) in every lab in turn,
#   each round starting one lab later; appends the Gbit/s to the caller's associative arrays V
#   (TCP) and U (UDP), by lab name.
# med VALUES...: their median; pct A B: A as a percentage of B.

labs_down() {
  local p f
  for p in "$TMP"/*.pid; do
    [ -s "$p" ] && kill "$(cat "$p")" 2>/dev/null || true
  done
  for f in "${LABS[@]}"; do
    "$BIN/weft-lab" down "$f" --name "$(basename "$f" .yaml)" >/dev/null 2>&1 || true
  done
  rm -rf "$TMP"
}

iperf_servers() {
  local n
  for n in "${NAMES[@]}"; do
    ip netns exec "wl-$n-w-server" iperf3 -s -D -I "$TMP/$n.pid" >/dev/null
  done
  sleep 0.5
}

server_ip() { # lab -> the IPv4 address of its server's eth0
  ip -n "wl-$1-w-server" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1
}

iperf_once() {
  local l="$1" ip try v; shift
  ip=$(server_ip "$l")
  for try in 1 2; do
    timeout $((T + 20)) ip netns exec "wl-$l-w-client" iperf3 -c "$ip" -t "$T" --connect-timeout 3000 -J "$@" > "$TMP/ip.json" 2>&1 || true
    if v=$(python3 -c 'import json,sys; print("%.2f" % (json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"]/1e9))' "$TMP/ip.json" 2>/dev/null); then
      echo "$v"; return
    fi
    echo "iperf3 $l $* (try $try) failed: $(grep -m1 '"error"' "$TMP/ip.json" || head -c 200 "$TMP/ip.json")" >&2
    sleep 1
  done
}

iperf_reps() {
  local r i n
  for r in $(seq 1 "$REPS"); do
    for i in $(seq 0 $((${#NAMES[@]} - 1))); do
      n="${NAMES[$(( (i + r - 1) % ${#NAMES[@]} ))]}"
      V[$n]+=" $(iperf_once "$n")"
      [ -n "$UDP" ] && U[$n]+=" $(iperf_once "$n" -u -b 0 -l 1400)"
    done
  done
}

med() { python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print("%.2f" % statistics.median(v) if v else 0)' "$@"; }
pct() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print('%.1f' % (a/b*100) if b else 'n/a')" "$1" "$2"; }
