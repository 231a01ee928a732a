# One command per task. Network namespaces and nftables need root.
CARGO ?= cargo
DEB_PACKAGES := nftables iproute2 iputils-ping

.PHONY: lab test test-clients test-cluster cluster cluster-down deps build fmt lint generate check-generated

## lab: run the lab on the NAT example (no cluster needed)
lab: deps build
	target/debug/weft-lab examples/lab/nat.yaml

## test: unit, privileged (network namespaces) and end-to-end tests, then the real CNI clients' and the real cluster's
test: deps build
	$(CARGO) test --workspace --locked
	python3 -m doctest bench/lib/ab_report.py
	e2e/clients/test.sh
	e2e/cluster/test.sh

## test-clients: only weft driven by libcni v1.1.2/v1.3.0, containerd 1.6's ctr and podman 4
test-clients: build
	e2e/clients/test.sh

## test-cluster: only the real cluster's end-to-end tests (builds the cluster first)
test-cluster:
	e2e/cluster/test.sh

## cluster: a real cluster on this machine (kube-apiserver, 2 kubelets, containerd) with weft's images loaded
cluster:
	e2e/cluster/cluster.sh up
	@echo 'kubectl: e2e/cluster/cluster.sh kubectl ...   helm: e2e/cluster/cluster.sh helm ...'

cluster-down:
	e2e/cluster/cluster.sh down

## deps: install the kernel tools the dataplane and the tests use (Debian/Ubuntu, as root)
deps:
	@missing=""; \
	command -v nft >/dev/null 2>&1 || missing="$$missing nftables"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v ping >/dev/null 2>&1 || missing="$$missing iputils-ping"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEB_PACKAGES) >/dev/null; \
	fi

## build: every binary into target/debug: weft-operator, weft (the CNI plugin) and weft-lab
build:
	$(CARGO) build --workspace --locked

fmt:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## generate: regenerate the CRD YAML from the Rust types
generate:
	$(CARGO) run -q -p weft-crds --bin crdgen -- --write crds/generated
	cp crds/generated/*.yaml charts/weft/crds/
