#!/usr/bin/env bash
# Builds the real cluster's binaries from the pinned Go modules in e2e/cluster/tools/ and installs
# the Debian packages it runs on. Nothing is downloaded but Go modules and Debian packages.
#
#   e2e/cluster/build.sh            # prints the bin directory on its last line
#
# Binaries go to $WEFT_CLUSTER_CACHE/bin-<hash of the go.mod/go.sum files> (default
# ~/.cache/weft-cluster), so a second run with the same pins only checks; the Go build cache
# makes a rebuild after a pin change incremental.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${WEFT_CLUSTER_CACHE:-$HOME/.cache/weft-cluster}
k8s_version=v1.36.3

debs=(etcd-server runc busybox-static iproute2 nftables iputils-ping gcc libc6-dev python3 python3-yaml)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

hash=$(cat "$here"/tools/*/go.mod "$here"/tools/*/go.sum "$0" | sha256sum | cut -c1-16)
bin=$cache/bin-$hash
if [ -f "$bin/.complete" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$bin"

ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $p.gitVersion=$k8s_version -X $p.gitMajor=1 -X $p.gitMinor=36 -X $p.gitTreeState=clean"
done
build() { # module dir, extra go build flags..., packages...
  local dir=$1; shift
  echo "building $(basename "$dir") ..." >&2
  (cd "$dir" && go build -trimpath "$@")
}
start=$SECONDS
build "$here/tools/kubernetes" -ldflags "$ldflags" -o "$bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubectl
build "$here/tools/containerd" -tags no_btrfs,no_devmapper,no_zfs -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=v2.4.2" -o "$bin/" \
  github.com/containerd/containerd/v2/cmd/containerd \
  github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
  github.com/containerd/containerd/v2/cmd/ctr
build "$here/tools/cri-tools" -ldflags "-s -w" -o "$bin/" sigs.k8s.io/cri-tools/cmd/crictl
build "$here/tools/helm" -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=v4.3.2" -o "$bin/" helm.sh/helm/v4/cmd/helm
echo "built in $((SECONDS - start)) s" >&2
touch "$bin/.complete"
echo "$bin"
