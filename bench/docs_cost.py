#!/usr/bin/env python3
"""What `openapi.schemas` costs: start-up time and idle memory (which it must not change, as
the spec is read only when the docs are first visited), then the first /openapi.json's build
time, size and the memory held after it. Interleaved rounds, medians.

Usage: python3 bench/docs_cost.py [BINARY] [ROUNDS]   (default target/release/oa-bypass, 5)
"""
import json, os, socket, statistics, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/oa-bypass")
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
spec = os.path.join(ROOT, "spec/openai-openapi.json")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def one(schemas):
    port = free_port()
    env = dict(os.environ, OA_BYPASS_SERVER__HOST="127.0.0.1", OA_BYPASS_SERVER__PORT=str(port),
               OA_BYPASS_SERVER__WORKERS="2", OA_BYPASS_LOG__LEVEL="warn")
    if schemas:
        env["OA_BYPASS_OPENAPI__SCHEMAS"] = spec
    with tempfile.TemporaryDirectory() as cwd:
        start = time.perf_counter()
        proc = subprocess.Popen([binary], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    get(f"http://127.0.0.1:{port}/health")
                    break
                except OSError:
                    time.sleep(0.001)
            started = (time.perf_counter() - start) * 1000
            time.sleep(1)
            idle = rss_kib(proc.pid)
            t = time.perf_counter()
            document = get(f"http://127.0.0.1:{port}/openapi.json")
            build = (time.perf_counter() - t) * 1000
            time.sleep(0.5)
            after = rss_kib(proc.pid)
            assert json.loads(document)["openapi"] == ("3.1.0" if schemas else "3.0.3")
            return started, idle, build, len(document), after
        finally:
            proc.terminate()
            proc.wait()


results = {False: [], True: []}
for _ in range(rounds):
    for schemas in (False, True):
        results[schemas].append(one(schemas))
print("| openapi.schemas | start to first answer (ms) | idle RSS (MiB) | first /openapi.json (ms) | its size (KiB) | RSS after (MiB) |")
print("|---|---|---|---|---|---|")
for schemas in (False, True):
    cols = list(zip(*results[schemas]))
    med = [statistics.median(c) for c in cols]
    print(f"| {'set' if schemas else 'unset'} | {med[0]:.1f} | {med[1] / 1024:.1f} | {med[2]:.0f} | {med[3] / 1024:.0f} | {med[4] / 1024:.1f} |")
