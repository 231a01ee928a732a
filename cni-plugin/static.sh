#!/usr/bin/env bash
# Builds the `weft` CNI plugin as weft ships it: a static binary linked with musl libc, for this
# machine's architecture. The container runtime starts the plugin once for every ADD, CHECK and
# DEL of every pod; a static binary skips the dynamic loader, which here is most of what starting
# a small process costs (docs/benchmarks.md, "Size and start time"); and position-dependent
# (`.cargo/config.toml`: no relocations to apply at each start, as Debian's builds of the
# reference plugins). The agent and the controller are long-running and stay ordinary builds.
#
#   cni-plugin/static.sh [CARGO_PROFILE]    # default: plugin (Cargo.toml); prints the binary's path
#
# Installs the Rust standard library for the musl target with rustup when it is missing (the
# target needs no C toolchain of its own: Rust ships musl's start files and libc); where that
# cannot be fetched, it says so and builds the plugin for the host's libc instead.
set -euo pipefail
profile=${1:-plugin}
target="$(uname -m)-unknown-linux-musl"
cd "$(dirname "$0")/.."
dir=$profile
[ "$profile" = dev ] && dir=debug
if ! rustup target list --installed | grep -qx "$target" && ! rustup target add "$target" >&2; then
  # Without the musl standard library (no network to fetch it), the plugin is built for the
  # host's libc: it works the same, only its start costs the dynamic loader's time.
  echo "static.sh: cannot install the $target standard library; building the plugin dynamically linked instead" >&2
  cargo build --profile "$profile" --locked -p weft-cni >&2
  echo "$PWD/target/$dir/weft"
  exit 0
fi
cargo build --profile "$profile" --locked -p weft-cni --target "$target" >&2
echo "$PWD/target/$target/$dir/weft"
