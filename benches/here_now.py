#!/usr/bin/env python3
"""here-now of the fanout room over HTTP while a load runs: 200 requests at ~20/s per page size.

Start a node and `presenced-load fanout --sessions 10000 ...` against it; once the ramp is done
(every join diff delivered), run:  PRESENCED_URL=http://127.0.0.1:4100 PRESENCED_PASSWORD=...
python3 benches/here_now.py   (BENCHMARKS.md, "here-now while loaded")
"""
import json, os, time, urllib.request
base = os.environ.get("PRESENCED_URL", "http://127.0.0.1:4100")
password = os.environ.get("PRESENCED_PASSWORD", "load-pass-123")
def call(method, path, body=None, token=None):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None)
    req.add_header("content-type", "application/json")
    if token: req.add_header("authorization", "Bearer " + token)
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())
tok = call("POST", "/api/v1/auth/login", {"email": "admin@localhost", "password": password})["access_token"]
acc = [a for a in call("GET", "/api/v1/accounts", token=tok)["accounts"] if a["name"] == "Load"][0]["id"]
def measure(path, n):
    lat = []
    for _ in range(n):
        t = time.perf_counter(); v = call("GET", path, token=tok); lat.append((time.perf_counter() - t) * 1000); time.sleep(0.05)
    lat.sort()
    return v, {"n": n, "p50": round(lat[n // 2], 2), "p90": round(lat[int(n * .9)], 2), "p99": round(lat[int(n * .99)], 2), "max": round(lat[-1], 2)}
p = f"/api/v1/accounts/{acc}/rooms/load-fanout/presence"
v, s = measure(p, 200); print("default page", len(v["presences"]), s)
v, s = measure(p + "?limit=1000", 200); print("limit=1000", len(v["presences"]), s)
