#!/usr/bin/env bash
# Builds the cluster's three images as docker-archive tars, without a registry or a container
# engine: the pause image (a static C program), a small test image (busybox-static) and weft's
# image (the release binaries, nft and ip with the libraries they load, busybox for the
# install-cni init container's shell).
#
#   e2e/cluster/images.sh OUTDIR              # writes OUTDIR/{pause,testbox,weft}.tar
#   e2e/cluster/images.sh OUTDIR testbox      # only the named images
#
# Image names (the chart and the tests use them with imagePullPolicy Never/IfNotPresent):
#   registry.k8s.io/pause:3.10, weft.test/testbox:1, ghcr.io/weft-dev/weft:dev
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:?usage: images.sh OUTDIR [pause|testbox|weft...]}
shift
wanted=" ${*:-pause testbox weft} "
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Copies a binary and every library it loads (none for a static one) into a root filesystem.
copy_with_libs() { # rootfs binary [dest]
  local root=$1 bin=$2 dest=${3:-$2}
  install -D -m 0755 "$bin" "$root$dest"
  { ldd "$bin" 2>/dev/null || true; } | { grep -oE '/[^ ]+' || true; } | while read -r lib; do
    [ -e "$lib" ] || continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}
busybox_root() { # rootfs applets...
  local root=$1; shift
  install -D -m 0755 /bin/busybox "$root/bin/busybox"
  for a in "$@"; do ln -sf busybox "$root/bin/$a"; done
  mkdir -p "$root/tmp" "$root/etc" "$root/proc" "$root/sys" "$root/dev" "$root/run"
  chmod 1777 "$root/tmp"
  echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
  echo 'root:x:0:' >"$root/etc/group"
}

if [[ $wanted == *" pause "* ]]; then
# pause: waits for a signal, reaps children (the sandbox's PID 1).
cat >"$work/pause.c" <<'EOF'
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int s) { (void)s; _exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
  signal(SIGINT, quit); signal(SIGTERM, quit); signal(SIGCHLD, reap);
  for (;;) pause();
}
EOF
mkdir -p "$work/pause/bin"
gcc -O2 -static -o "$work/pause/bin/pause" "$work/pause.c"
python3 "$here/image.py" "$work/pause" registry.k8s.io/pause:3.10 "$out/pause.tar" --entrypoint /bin/pause
fi

if [[ $wanted == *" testbox "* ]]; then
# testbox: busybox with the applets the probes use.
busybox_root "$work/testbox" sh ash cat echo sleep ls ip ping ping6 nc wget httpd hostname ifconfig \
  route arp timeout seq true false grep sed awk kill ps env mkdir rm date id
python3 "$here/image.py" "$work/testbox" weft.test/testbox:1 "$out/testbox.tar" --cmd /bin/sh
fi

if [[ $wanted == *" weft "* ]]; then
# weft: the release binaries (WEFT_IMAGE_PROFILE picks another cargo profile, for quicker
# rebuilds while working on the cluster tests); the CNI plugin static, as weft ships it
# (cni-plugin/static.sh).
profile=${WEFT_IMAGE_PROFILE:-release}
if [ "${WEFT_SKIP_CARGO:-0}" != 1 ]; then
  (cd "$repo" && cargo build --profile "$profile" --locked -p weft-operator -p kubectl-weft >&2)
  # The release image's plugin is built with the plugin profile (release, optimised for size).
  plugin=$("$repo/cni-plugin/static.sh" "${profile/#release/plugin}")
fi
[ "$profile" = dev ] && profile=debug
plugin=${plugin:-$repo/target/$(uname -m)-unknown-linux-musl/${profile/#release/plugin}/weft}
w=$work/weft
busybox_root "$w" sh cp mv cat ls rm mkdir ln echo sleep
copy_with_libs "$w" "$repo/target/$profile/weft-operator" /usr/local/bin/weft-operator
copy_with_libs "$w" "$plugin" /usr/local/bin/weft
copy_with_libs "$w" "$repo/target/$profile/kubectl-weft" /usr/local/bin/kubectl-weft
copy_with_libs "$w" "$(command -v nft)" /usr/sbin/nft
copy_with_libs "$w" "$(command -v ip)" /usr/sbin/ip
# nft and ip read protocol and service names (Debian's netbase).
for f in /etc/protocols /etc/services; do [ -f "$f" ] && install -D -m 0644 "$f" "$w$f"; done
for d in /etc/iproute2 /usr/share/iproute2 /usr/lib/iproute2; do
  [ -d "$d" ] && mkdir -p "$w$d" && cp -a "$d/." "$w$d/"
done
ln -sf /usr/sbin/nft "$w/usr/bin/nft" 2>/dev/null || { mkdir -p "$w/usr/bin"; ln -sf /usr/sbin/nft "$w/usr/bin/nft"; }
python3 "$here/image.py" "$w" ghcr.io/weft-dev/weft:dev "$out/weft.tar" \
  --entrypoint /usr/local/bin/weft-operator
fi
ls -l "$out" >&2
