#!/usr/bin/env python3
"""here-now of the fanout room over HTTP while a load runs: 200 requests at ~20/s per case.

Each case twice: over one kept-alive connection (what an HTTP client library does) and with a
new connection per request; `/healthz` (no work at all) shows what any request waits for on the
busy node. Start a node and `presenced-load fanout --sessions 10000 ...` against it; once the ramp
is done (every join diff delivered), run:  PRESENCED_URL=http://127.0.0.1:4100
PRESENCED_PASSWORD=... python3 benches/here_now.py   (BENCHMARKS.md, "here-now while loaded")
"""
import http.client, json, os, time, urllib.parse
base = urllib.parse.urlparse(os.environ.get("PRESENCED_URL", "http://127.0.0.1:4100"))
password = os.environ.get("PRESENCED_PASSWORD", "load-pass-123")
kept = http.client.HTTPConnection(base.hostname, base.port)
def call(method, path, body=None, token=None, keep=True):
    c = kept if keep else http.client.HTTPConnection(base.hostname, base.port)
    h = {"content-type": "application/json"}
    if token: h["authorization"] = "Bearer " + token
    c.request(method, path, body=json.dumps(body) if body else None, headers=h)
    r = c.getresponse(); v = json.loads(r.read())
    if not keep: c.close()
    return v
tok = call("POST", "/api/v1/auth/login", {"email": "admin@localhost", "password": password})["access_token"]
acc = [a for a in call("GET", "/api/v1/accounts", token=tok)["accounts"] if a["name"] == "Load"][0]["id"]
def measure(name, path, keep, n=200):
    lat = []
    for _ in range(n):
        t = time.perf_counter(); v = call("GET", path, token=tok, keep=keep); lat.append((time.perf_counter() - t) * 1000); time.sleep(0.05)
    lat.sort()
    size = len(v["presences"]) if "presences" in v else "-"
    print(f"{name:<13} {'kept-alive' if keep else 'new conn':<10} members {size:<5}", {"n": n, "p50": round(lat[n // 2], 2), "p90": round(lat[int(n * .9)], 2), "p99": round(lat[int(n * .99)], 2), "max": round(lat[-1], 2)}, flush=True)
p = f"/api/v1/accounts/{acc}/rooms/load-fanout/presence"
for keep in (True, False):
    measure("default page", p, keep)
    measure("limit=1000", p + "?limit=1000", keep)
    measure("healthz", "/healthz", keep)
