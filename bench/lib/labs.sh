# labs.sh — sourced by the benches that build labs with `weft-lab --keep` (policy-iperf.sh,
# mirror-iperf.sh).
#
# labs_down: kills the processes whose PIDs are in "$TMP"/*.pid (iperf3 servers), removes every
# lab file in the array LABS with `$BIN/weft-lab down` and removes $TMP. The caller sets BIN,
# TMP and LABS, and calls it from its EXIT trap.

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
