#!/usr/bin/env python3
"""Floods, probes and listeners for bench/flood.sh (python3 stdlib only, root for `send`).

  send     a bounded flood of new flows to DST:PORT from raw IPv4 packets: TCP SYNs or UDP
           datagrams, each from a random source port and (with --spoof CIDR) a random source
           address of CIDR; RATE a second for at most SECONDS, or until SIGTERM/SIGINT. Prints
           one JSON line: {"start": epoch of the first packet, "end", "sent", "errors"}.
  connect  COUNT sequential TCP connections to DST:PORT (optionally from --src), each given
           TIMEOUT seconds to be answered with a line (a listener of `serve`); prints JSON
           {"ok", "n", "first": epoch of the first attempt, "attempts": [[epoch, ok], ...]}.
  until-ok connections every INTERVAL seconds until one is answered (at most MAX seconds);
           prints JSON {"seconds": from the start to the answered attempt, or null}.
  ban      connections from --src to DST:PORT, one after the other, until one is not answered
           (at most --max); prints JSON {"attempts": [[epoch, ok], ...], "denied_at": index}.
  serve    answers every TCP connection on --tcp PORTS with one line and every UDP datagram
           on --udp PORTS with one datagram (runs until killed).
  audit    the first audit record of FILE that matches (--verdict, --kind, --workload, --src,
           --state) at or after --after EPOCH (minus one second, as the lab does); prints JSON
           {"seconds": its time minus --after, or null, "records": how many matched}.
  drops    the limit drop counter (packets) of ADDRESS in the node's `inet weft` table: the
           `limit_in`/`limit_out` chains' counter sets `drops_li4`/`drops_lo4`.
"""
import argparse
import ipaddress
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def cmd_send(a):
    if not 1 <= a.rate <= 200000:
        sys.exit("send: --rate must be 1..200000")
    if not 0 < a.seconds <= 600:
        sys.exit("send: --seconds must be in (0, 600]")
    dst = socket.inet_aton(a.dst)
    proto = 6 if a.proto == "tcp" else 17
    if a.spoof:
        net = ipaddress.ip_network(a.spoof)
        base, size = int(net.network_address), net.num_addresses
        src_of = lambda: struct.pack("!I", base + random.randrange(1, size - 1))  # noqa: E731
    else:
        fixed = socket.inet_aton(a.src)
        src_of = lambda: fixed  # noqa: E731
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    payload = b"weft-bench flood\n"
    count = int(a.rate * a.seconds)
    sent = errors = 0
    start = time.time()
    t0 = time.monotonic()
    step = 1.0 / a.rate
    for i in range(count):
        if stop.is_set():
            break
        due = t0 + i * step
        ahead = due - time.monotonic()
        if ahead > 0.001:
            time.sleep(ahead)
        src = src_of()
        sport = random.randrange(1024, 65536)
        if proto == 6:
            tcp = struct.pack("!HHIIBBHHH", sport, a.dport, random.getrandbits(32), 0,
                              5 << 4, 0x02, 64240, 0, 0)
            pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
            tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
            l4 = tcp
        else:
            l4 = struct.pack("!HHHH", sport, a.dport, 8 + len(payload), 0) + payload
        # The kernel fills the IP checksum, the total length and (when 0) the id.
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, src, dst)
        try:
            s.sendto(ip + l4, (a.dst, 0))
            sent += 1
        except OSError:
            errors += 1
    print(json.dumps({"start": start, "end": time.time(), "sent": sent, "errors": errors,
                      "rate": a.rate}), flush=True)


def attempt(dst, port, timeout, src=None):
    """One connection; True when the listener's line came back within `timeout`."""
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(timeout)
    try:
        if src:
            c.bind((src, 0))
        c.connect((dst, port))
        return bool(c.recv(128))
    except OSError:
        return False
    finally:
        c.close()


def cmd_connect(a):
    out = []
    for _ in range(a.count):
        t = time.time()
        ok = attempt(a.dst, a.port, a.timeout, a.src)
        out.append([t, ok])
        if ok and a.interval:
            time.sleep(a.interval)
    print(json.dumps({"ok": sum(1 for _, ok in out if ok), "n": len(out),
                      "first": out[0][0] if out else None, "attempts": out}), flush=True)


def cmd_until_ok(a):
    t0 = time.monotonic()
    while time.monotonic() - t0 < a.max:
        t = time.monotonic()
        if attempt(a.dst, a.port, a.timeout, a.src):
            print(json.dumps({"seconds": t - t0}), flush=True)
            return
        time.sleep(max(0.0, a.interval - (time.monotonic() - t)))
    print(json.dumps({"seconds": None}), flush=True)


def cmd_ban(a):
    out = []
    denied = None
    for i in range(a.max):
        t = time.time()
        ok = attempt(a.dst, a.port, a.timeout, a.src)
        out.append([t, ok])
        if not ok:
            denied = i
            break
    print(json.dumps({"attempts": out, "denied_at": denied}), flush=True)


def cmd_serve(a):
    line = ("weft-bench %s\n" % a.name).encode()

    def tcp(port):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(4096)
        while True:
            c, _ = s.accept()
            try:
                c.sendall(line)
            except OSError:
                pass
            c.close()

    def udp(port):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        while True:
            _, peer = s.recvfrom(2048)
            try:
                s.sendto(line, peer)
            except OSError:
                pass

    threads = [threading.Thread(target=tcp, args=(p,), daemon=True) for p in a.tcp]
    threads += [threading.Thread(target=udp, args=(p,), daemon=True) for p in a.udp]
    for t in threads:
        t.start()
    while True:
        time.sleep(3600)


def parse_time(text):
    """RFC 3339 with up to nanoseconds and a Z -> epoch seconds."""
    main, _, frac = text.rstrip("Z").partition(".")
    t = time.mktime(time.strptime(main, "%Y-%m-%dT%H:%M:%S")) - time.timezone
    return t + (float("0." + frac) if frac else 0.0)


def cmd_audit(a):
    first, n = None, 0
    try:
        lines = open(a.file).read().splitlines()
    except OSError:
        lines = []
    for l in lines:
        try:
            r = json.loads(l)
        except ValueError:
            continue
        if a.verdict and r.get("verdict") != a.verdict:
            continue
        if a.kind and r.get("kind") != a.kind:
            continue
        if a.state and r.get("state") != a.state:
            continue
        if a.workload and r.get("workload") != a.workload:
            continue
        if a.src and r.get("src") != a.src:
            continue
        t = parse_time(r["time"])
        if t < a.after - 1:
            continue
        n += 1
        first = t if first is None else min(first, t)
    print(json.dumps({"seconds": None if first is None else first - a.after, "records": n}))


def cmd_drops(a):
    """Sum of the counters of ADDRESS's elements in the limit chains' drop sets."""
    ns = ["ip", "netns", "exec", a.netns] if a.netns else []
    total = 0
    for name in ("drops_li4", "drops_lo4"):
        data = subprocess.run(ns + ["nft", "-j", "list", "set", "inet", "weft", name],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
        for o in json.loads(data or b'{"nftables": []}')["nftables"]:
            for e in (o.get("set") or {}).get("elem", []):
                el = e.get("elem", e) if isinstance(e, dict) else e
                if isinstance(el, dict) and el.get("val") == a.address:
                    total += el.get("counter", {}).get("packets", 0)
    print(total)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("send")
    p.add_argument("--proto", choices=["tcp", "udp"], required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--dport", type=int, required=True)
    p.add_argument("--rate", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--spoof", help="random source addresses from this CIDR")
    g.add_argument("--src", help="this source address (random source ports)")
    for name in ("connect", "until-ok", "ban"):
        p = sub.add_parser(name)
        p.add_argument("--dst", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--src")
        p.add_argument("--timeout", type=float, default=1.0)
        if name == "connect":
            p.add_argument("--count", type=int, default=20)
            p.add_argument("--interval", type=float, default=0.1)
        if name == "until-ok":
            p.add_argument("--interval", type=float, default=1.0)
            p.add_argument("--max", type=float, default=300)
        if name == "ban":
            p.add_argument("--max", type=int, default=30)
    p = sub.add_parser("serve")
    p.add_argument("--name", default="workload")
    p.add_argument("--tcp", type=int, nargs="*", default=[])
    p.add_argument("--udp", type=int, nargs="*", default=[])
    p = sub.add_parser("audit")
    p.add_argument("--file", required=True)
    p.add_argument("--after", type=float, required=True)
    for k in ("verdict", "kind", "workload", "src", "state"):
        p.add_argument("--" + k)
    p = sub.add_parser("drops")
    p.add_argument("--netns")
    p.add_argument("address")
    a = ap.parse_args()
    {"send": cmd_send, "connect": cmd_connect, "until-ok": cmd_until_ok, "ban": cmd_ban,
     "serve": cmd_serve, "audit": cmd_audit, "drops": cmd_drops}[a.cmd](a)


if __name__ == "__main__":
    main()
