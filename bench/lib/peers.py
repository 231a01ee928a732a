"""peers.py N FILE — a peers file of N workloads of another node, as its agent publishes them:
network `bench`, namespace `default`, label app=peer, addresses in 10.90.0.0/16 two apart (no
two adjacent, so none merge into a range). A policy whose group selects app=peer then holds N
set elements on the node that reads the file."""
import json
import sys

n = int(sys.argv[1])
assert n <= 125 * 256, "at most 32,000 peers"
json.dump([{"network": "bench", "namespace": "default", "name": "peer%d" % i,
            "labels": {"app": "peer"}, "ips": ["10.90.%d.%d" % (i // 125, 2 + 2 * (i % 125))]}
           for i in range(n)], open(sys.argv[2], "w"))
