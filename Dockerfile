# weft image: weft-operator (controller, agent), the weft CNI plugin and the kubectl weft plugin.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The CNI plugin is static (musl): the runtime starts it for every pod's ADD and DEL, and a
# static binary starts without the dynamic loader (cni-plugin/static.sh).
RUN cargo build --release --locked -p weft-operator -p kubectl-weft \
 && cp target/release/weft-operator target/release/kubectl-weft /usr/local/bin/ \
 && cp "$(cni-plugin/static.sh)" /usr/local/bin/weft

FROM debian:bookworm-slim
# nft applies weft's table; iproute2 is for people debugging a node from the agent's pod.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iproute2 netbase \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/weft-operator /usr/local/bin/weft /usr/local/bin/kubectl-weft /usr/local/bin/
# The controller runs as 65532 (set in the chart). The agent must run as root in the host
# network namespace (with NET_ADMIN/SYS_ADMIN only, not privileged), so the image has no USER.
ENTRYPOINT ["/usr/local/bin/weft-operator"]
