# node.sh — sourced by the benches that run a weft agent in a throw-away "node" namespace.
#
# node_up PREFIX TMP_TEMPLATE: makes the namespace "${PREFIX}node" ($NODE_NS, loopback up) and a
# temporary directory ($TMP), and on exit (or INT/TERM) stops the agent whose PID the caller
# puts in $AGENT_PID, deletes every namespace whose name starts with $PREFIX (the node's and
# the pods') and removes $TMP.

node_up() {
  PREFIX=$1
  NODE_NS="${PREFIX}node"
  TMP="$(mktemp -d "$2")"
  AGENT_PID=""
  trap node_cleanup EXIT
  trap 'exit 130' INT TERM
  ip netns add "$NODE_NS"
  ip -n "$NODE_NS" link set lo up
}

node_cleanup() {
  local rc=$? ns
  trap - EXIT INT TERM
  if [ -n "$AGENT_PID" ]; then kill "$AGENT_PID" 2>/dev/null || true; wait "$AGENT_PID" 2>/dev/null || true; fi
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${PREFIX}" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$TMP"
  exit "$rc"
}
