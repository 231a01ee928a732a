#!/usr/bin/env python3
"""Helpers of bench/peers-scale.sh (python3 stdlib only). The API server is reached with the
admin client certificate of a kubeconfig directory (ca.crt, admin.crt, admin.key).

  proxy     a TCP relay from 127.0.0.1:LISTEN inside the network namespace --netns to
            127.0.0.1:UPSTREAM outside it (TLS passes through untouched: the agent sees the API
            server's own certificate, issued for 127.0.0.1); writes "DOWN UP CONNECTIONS" (bytes
            from the API server to the client, bytes the other way, connections accepted) to
            --out every 100 ms.
  nodes     creates Nodes node-0 … node-(N-1), labelled and annotated for kwok.
  pods      creates pods START … STOP-1 of each of the N nodes (spec.nodeName set: no scheduler
            runs), concurrently; prints JSON {"pods", "seconds"}.
  publish   what each node's agent would write: its NodeNetwork status (server-side apply of
            the whole status, field manager weft-agent) with PER workloads, concurrently.
  quiet     waits until the proxy's count (--out) has grown by at most FLOOR bytes a second for
            QUIET seconds (after a first byte when --first); prints JSON {"bytes", "seconds"}
            (both to the end of the quiet window) and "active" (seconds to its start).
  idle      the proxy's bytes over SECONDS; prints JSON {"bytes", "seconds"}.
  round     one pod started on NODE: the Pod created (kwok runs it), then its workload added to
            NODE's NodeNetwork status as its agent would (server-side apply, PER + INDEX
            workloads); the bytes the client of the proxy receives until quiet (as `quiet`), and (with --netns) how long until the node's nftables ruleset holds the new
            address. Prints JSON.
  watchsizes  sums apiserver_watch_events_sizes per resource from /metrics on stdin.

Workloads are deterministic: pod J of node I (K = I * PER + J) has app APPS[K % 10] and the
address (the node's block) + 2 + J; the pods of `round` (J >= PER) have app `web` and the
addresses + PER + 2 + 2 * (J - PER + 1), two apart, so no two merge into one set range.
"""
import argparse
import asyncio
import collections
import concurrent.futures as cf
import ctypes
import hashlib
import http.client
import ipaddress
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time

NETWORK = "pods"
NAMESPACE = "bench"
APPS = ["web", "api", "cache", "db", "worker", "auth", "search", "billing", "mail", "queue"]
TIERS = {"web": "frontend", "api": "backend", "cache": "data", "db": "data", "worker": "backend",
         "auth": "backend", "search": "backend", "billing": "backend", "mail": "backend",
         "queue": "data"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the API server
class Api:
    """One keep-alive HTTPS connection to the API server (one per thread)."""

    def __init__(self, port, certs):
        self.port = port
        self.ctx = ssl.create_default_context(cafile=os.path.join(certs, "ca.crt"))
        self.ctx.load_cert_chain(os.path.join(certs, "admin.crt"), os.path.join(certs, "admin.key"))
        self.conn = None

    def request(self, method, path, body=None, ctype="application/json", ok=(200, 201)):
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        for attempt in range(5):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=120)
                headers = {"Accept": "application/json"}
                if data is not None:
                    headers["Content-Type"] = ctype
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                payload = r.read()
            except (OSError, http.client.HTTPException) as e:
                self.conn = None
                if attempt == 4:
                    raise
                log(f"{method} {path}: {e}; retrying")
                time.sleep(1 + attempt)
                continue
            if r.status in ok:
                return json.loads(payload) if payload else None
            if r.status in (429, 500, 503, 504) and attempt < 4:
                time.sleep(1 + attempt)
                continue
            raise RuntimeError(f"{method} {path}: HTTP {r.status}: {payload[:300].decode(errors='replace')}")
        raise RuntimeError(f"{method} {path}: no answer")


_local = threading.local()


def api(a):
    if getattr(_local, "api", None) is None:
        _local.api = Api(a.api, a.certs)
    return _local.api


def run_all(a, fn, items, threads):
    """fn(item) for every item on `threads` threads; raises the first error."""
    done = 0
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(threads) as ex:
        futures = [ex.submit(fn, i) for i in items]
        for f in cf.as_completed(futures):
            f.result()
            done += 1
            if done % 10000 == 0:
                log(f"  {done} of {len(futures)} in {time.monotonic() - t0:.0f} s")
    return time.monotonic() - t0


# ---------------------------------------------------------------- the objects
def pod_meta(node_index, j, per):
    """Name and labels of pod j of node node_index (a Deployment's pod, by its looks)."""
    k = node_index * per + j
    app = "web" if j >= per else APPS[k % len(APPS)]
    version = "v2" if k % 3 == 0 else "v1"
    template_hash = hashlib.sha256(f"{app}-{version}".encode()).hexdigest()[:10]
    # Five characters of the alphabet Kubernetes draws pod name suffixes from, one-to-one with
    # (node, j) for up to PER + 16 pods a node.
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    x = (node_index * (per + 16) + j) * 7919 % len(alphabet) ** 5
    suffix = ""
    for _ in range(5):
        x, d = divmod(x, len(alphabet))
        suffix += alphabet[d]
    labels = {"app": app, "tier": TIERS[app], "pod-template-hash": template_hash,
              "version": version, "app.kubernetes.io/part-of": "shop"}
    return f"{app}-{template_hash}-{suffix}", labels


def workload_ip(block, j, per):
    net = ipaddress.ip_network(block)
    offset = 2 + j if j < per else per + 2 + 2 * (j - per + 1)
    if offset >= net.num_addresses - 1:
        raise SystemExit(f"workload {j} does not fit in block {block}")
    return str(net.network_address + offset)


def pod_object(node_index, j, per):
    name, labels = pod_meta(node_index, j, per)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
            "spec": {"nodeName": f"node-{node_index}", "automountServiceAccountToken": False,
                     "terminationGracePeriodSeconds": 30,
                     "containers": [{"name": labels["app"],
                                     "image": f"registry.example/shop/{labels['app']}:1.4.2",
                                     "ports": [{"name": "http", "containerPort": 8080}],
                                     "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                                   "limits": {"memory": "256Mi"}}}]}}


def workload(node_index, j, per, block):
    name, labels = pod_meta(node_index, j, per)
    mac = "02:" + ":".join(f"{b:02x}" for b in hashlib.sha256(f"{node_index}/{j}".encode()).digest()[:5])
    return {"network": NETWORK, "namespace": NAMESPACE, "name": name, "labels": labels,
            "ips": [workload_ip(block, j, per)], "mac": mac}


def node_index(name):
    return int(name.rsplit("-", 1)[1])


def status_body(name, generation, block, count, per):
    i = node_index(name)
    return {"apiVersion": "weft.dev/v1alpha1", "kind": "NodeNetwork",
            "status": {"observedGeneration": generation,
                       "conditions": [{"type": "Ready", "status": "True", "reason": "Realized",
                                       "message": "every network of the node is realized",
                                       "lastTransitionTime": "2026-01-01T00:00:00Z",
                                       "observedGeneration": generation}],
                       "networks": [NETWORK], "bridges": [f"wn-{NETWORK}"], "endpoints": count,
                       "workloads": [workload(i, j, per, block) for j in range(count)]}}


def apply_status(a, name, generation, block, count):
    api(a).request("PATCH", f"/apis/weft.dev/v1alpha1/nodenetworks/{name}/status"
                   "?fieldManager=weft-agent&force=true",
                   status_body(name, generation, block, count, a.per),
                   ctype="application/apply-patch+yaml")


def blocks(a):
    """name -> (generation, the IPv4 block of NETWORK) of every NodeNetwork."""
    out = {}
    for item in api(a).request("GET", "/apis/weft.dev/v1alpha1/nodenetworks")["items"]:
        for b in item.get("spec", {}).get("blocks", []):
            if b.get("network") == NETWORK and b.get("ipv4"):
                out[item["metadata"]["name"]] = (item["metadata"].get("generation", 1), b["ipv4"])
    return out


def cmd_nodes(a):
    def create(i):
        api(a).request("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": f"node-{i}",
                         "labels": {"kubernetes.io/hostname": f"node-{i}", "kubernetes.io/os": "linux",
                                    "type": "kwok", "topology.kubernetes.io/zone": f"zone-{i % 3}"},
                         "annotations": {"kwok.x-k8s.io/node": "fake"}}})
    took = run_all(a, create, range(a.nodes), a.threads)
    print(f"{a.nodes} Nodes created in {took:.1f} s")


def cmd_pods(a):
    items = [(i, j) for j in range(a.start, a.stop) for i in range(a.nodes)]
    # 409: created by an earlier try whose answer was lost (names are unique).
    took = run_all(a, lambda ij: api(a).request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods",
                                                pod_object(ij[0], ij[1], a.per), ok=(201, 409)),
                   items, a.threads)
    print(json.dumps({"pods": len(items), "seconds": round(took, 1)}))


def cmd_publish(a):
    got = blocks(a)
    missing = [f"node-{i}" for i in range(a.nodes) if f"node-{i}" not in got]
    if missing:
        raise SystemExit(f"no block of {NETWORK} yet on {len(missing)} node(s), e.g. {missing[0]}")
    took = run_all(a, lambda i: apply_status(a, f"node-{i}", got[f"node-{i}"][0], got[f"node-{i}"][1], a.per),
                   range(a.first, a.nodes), a.threads)
    print(json.dumps({"statuses": a.nodes - a.first, "seconds": round(took, 1)}))


# ---------------------------------------------------------------- the proxy
def cmd_proxy(a):
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet = 0x40000000

    def setns(fd):
        if libc.setns(fd, clone_newnet) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    import socket
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(a.netns, os.O_RDONLY)
    setns(target)  # the listening socket lives in the node's namespace ...
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", a.listen))
    sock.listen(64)
    setns(home)  # ... the connections to the API server in this one
    counts = {"down": 0, "up": 0, "conns": 0}

    async def pipe(reader, writer, key):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                counts[key] += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                writer.close()
            except OSError:
                pass

    async def serve(c_reader, c_writer):
        counts["conns"] += 1
        try:
            u_reader, u_writer = await asyncio.open_connection("127.0.0.1", a.upstream)
        except OSError:
            c_writer.close()
            return
        await asyncio.gather(pipe(c_reader, u_writer, "up"), pipe(u_reader, c_writer, "down"))

    async def report():
        tmp = a.out + ".tmp"
        while True:
            with open(tmp, "w") as f:
                f.write(f"{counts['down']} {counts['up']} {counts['conns']}\n")
            os.replace(tmp, a.out)
            await asyncio.sleep(0.1)

    async def main():
        server = await asyncio.start_server(serve, sock=sock)
        asyncio.get_running_loop().create_task(report())
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def down(out):
    for _ in range(50):
        try:
            with open(out) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            time.sleep(0.02)
    raise SystemExit(f"cannot read the proxy's count {out}")


def wait_quiet(out, quiet, limit, floor, first=False, start=None):
    """Waits until the proxy got at most floor * quiet bytes in the last `quiet` seconds (after a
    first byte with `first`); returns (bytes since start, seconds since the call, seconds from
    the call to the start of that quiet window)."""
    t0 = time.monotonic()
    base = down(out) if start is None else start
    window = collections.deque()
    while True:
        time.sleep(0.1)
        n, now = down(out), time.monotonic()
        window.append((now, n))
        while window[0][0] < now - quiet:
            window.popleft()
        if now - t0 >= quiet and (not first or n > base) and n - window[0][1] <= floor * quiet:
            return n - base, now - t0, window[0][0] - t0
        if now - t0 > limit:
            raise SystemExit(f"still receiving after {limit} s ({n - base} bytes)")


def cmd_quiet(a):
    b, s, active = wait_quiet(a.out, a.quiet, a.limit, a.floor, first=a.first, start=0 if a.first else None)
    print(json.dumps({"bytes": b, "seconds": round(s, 2), "active": round(active, 2)}))


def cmd_idle(a):
    n0, t0 = down(a.out), time.monotonic()
    time.sleep(a.seconds)
    n1, t1 = down(a.out), time.monotonic()
    print(json.dumps({"bytes": n1 - n0, "seconds": round(t1 - t0, 2)}))


# ---------------------------------------------------------------- one pod on another node
def nft_has(netns, ip):
    """Whether the ruleset of netns holds address ip, and how long listing it took (s)."""
    t = time.monotonic()
    r = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "ruleset"],
                       capture_output=True, text=True)
    found = re.search(r"(?<![\d.])" + re.escape(ip) + r"(?![\d])", r.stdout) is not None
    return found, time.monotonic() - t


def cmd_round(a):
    i = node_index(a.node)
    j = a.per + a.index - 1
    got = blocks(a)
    if a.node not in got:
        raise SystemExit(f"{a.node} has no block of {NETWORK}")
    generation, block = got[a.node]
    ip = workload_ip(block, j, a.per)
    before_pod = down(a.out)
    t_pod = time.monotonic()
    pod = pod_object(i, j, a.per)
    name = pod["metadata"]["name"]
    api(a).request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod)
    while a.wait_running:  # kwok runs it
        p = api(a).request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}")
        if p.get("status", {}).get("phase") == "Running":
            break
        if time.monotonic() - t_pod > 300:
            raise SystemExit(f"pod {name} not Running after 300 s (is kwok running?)")
        time.sleep(0.05)
    pod_seconds = time.monotonic() - t_pod
    start = down(a.out)
    seen = {}

    def watch_rules():
        while time.monotonic() - t0 < a.limit:
            found, listing = nft_has(a.netns, ip)
            seen["listing"] = max(seen.get("listing", 0), listing)
            if found:
                seen["seconds"] = time.monotonic() - t0
                return
            time.sleep(0.02)

    t0 = time.monotonic()
    apply_status(a, a.node, generation, block, a.per + a.index)
    rules = None
    if a.netns:
        rules = threading.Thread(target=watch_rules, daemon=True)
        rules.start()
    got_bytes, seconds, active = wait_quiet(a.out, a.quiet, a.limit, a.floor, start=start)
    if rules:
        rules.join(timeout=1)
    print(json.dumps({"pod": name, "ip": ip, "pod_running_seconds": round(pod_seconds, 2),
                      "bytes_while_pod_started": start - before_pod,
                      "bytes": got_bytes, "seconds": round(seconds, 2), "active": round(active, 2),
                      "in_rules_seconds": round(seen["seconds"], 3) if "seconds" in seen else None,
                      "listing_seconds": round(seen["listing"], 3) if "listing" in seen else None}))


def cmd_watchsizes(a):
    sums, counts = {}, {}
    for line in sys.stdin:
        m = re.match(r"apiserver_watch_events_sizes_(sum|count)\{([^}]*)\} (\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        key = labels.get("resource") or labels.get("kind") or "?"
        if labels.get("group"):
            key += "." + labels["group"]
        (sums if m.group(1) == "sum" else counts)[key] = float(m.group(3))
    for key in sorted(sums, key=lambda k: -sums[k]):
        n = counts.get(key, 0)
        print(f"  {key}: {int(n)} events, {sums[key] / 1e6:.1f} MB"
              + (f", {sums[key] / n / 1e3:.1f} kB each" if n else ""))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_api(s):
        s.add_argument("--api", type=int, required=True, help="the API server's port on 127.0.0.1")
        s.add_argument("--certs", required=True, help="directory of ca.crt, admin.crt, admin.key")
        s.add_argument("--threads", type=int, default=8)
        s.add_argument("--per", type=int, default=110, help="pods (workloads) per node")
        return s

    s = with_api(sub.add_parser("nodes"))
    s.add_argument("--nodes", type=int, required=True)
    s = with_api(sub.add_parser("pods"))
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--start", type=int, default=0, help="the first pod index J of each node")
    s.add_argument("--stop", type=int, required=True, help="past the last pod index J")
    s = with_api(sub.add_parser("publish"))
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--first", type=int, default=0, help="the first node to publish")
    s = sub.add_parser("proxy")
    s.add_argument("--netns", required=True, help="path of the namespace (/run/netns/NAME)")
    s.add_argument("--listen", type=int, required=True)
    s.add_argument("--upstream", type=int, required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("quiet")
    s.add_argument("--out", required=True)
    s.add_argument("--quiet", type=float, default=5)
    s.add_argument("--floor", type=float, default=0, help="bytes a second that still count as quiet")
    s.add_argument("--limit", type=float, default=1800)
    s.add_argument("--first", action="store_true", help="count from 0 and wait for a first byte")
    s = sub.add_parser("idle")
    s.add_argument("--out", required=True)
    s.add_argument("--seconds", type=float, default=60)
    s = with_api(sub.add_parser("round"))
    s.add_argument("--out", required=True)
    s.add_argument("--node", required=True)
    s.add_argument("--index", type=int, required=True, help="1 for the first extra pod")
    s.add_argument("--quiet", type=float, default=3)
    s.add_argument("--floor", type=float, default=0, help="bytes a second that still count as quiet")
    s.add_argument("--limit", type=float, default=600)
    s.add_argument("--netns", default="", help="a namespace whose ruleset should get the address")
    s.add_argument("--wait-running", action="store_true", help="wait until kwok runs the pod")
    sub.add_parser("watchsizes")
    a = p.parse_args()
    {"nodes": cmd_nodes, "pods": cmd_pods, "publish": cmd_publish, "proxy": cmd_proxy,
     "quiet": cmd_quiet, "idle": cmd_idle, "round": cmd_round, "watchsizes": cmd_watchsizes}[a.cmd](a)


if __name__ == "__main__":
    main()
