#!/usr/bin/env bash
# Builds kwok (fake nodes and pods for the benchmarks) from the pinned Go module in
# bench/tools/kwok/ and prints its directory on its last line: `kwok` (the binary) and
# `stages.yaml` (kwok's default stages, as kwokctl configures them: nodes become Ready and renew
# a Lease, pods become Running), taken from the same module. Benchmarks only: CI does not build
# it (e2e/cluster/build.sh builds what CI runs).
#
# The directory is $WEFT_BENCH_CACHE/kwok-<hash of go.mod and go.sum> (default
# ~/.cache/weft-bench), so a second run with the same pin only checks.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${WEFT_BENCH_CACHE:-$HOME/.cache/weft-bench}
hash=$(cat "$here/kwok/go.mod" "$here/kwok/go.sum" | sha256sum | cut -c1-16)
out=$cache/kwok-$hash
if [ -f "$out/.complete" ]; then
  echo "$out"
  exit 0
fi
command -v go >/dev/null || { echo "go missing: kwok is built from its Go module" >&2; exit 2; }
mkdir -p "$out"
cd "$here/kwok"
export GOFLAGS=-buildvcs=false
version=$(go list -m -f '{{.Version}}' sigs.k8s.io/kwok)
echo "building kwok $version ..." >&2
start=$SECONDS
go build -trimpath -ldflags "-s -w" -o "$out/kwok" sigs.k8s.io/kwok/cmd/kwok
stages=$(go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage
for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
  pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
  echo "---"
  cat "$stages/$f"
done >"$out/stages.yaml"
echo "built kwok $version in $((SECONDS - start)) s" >&2
touch "$out/.complete"
echo "$out"
