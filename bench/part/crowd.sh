# bench/run, part "crowd": thousands of event streams open at once, each sent an event every
# second (a model's answer waits that long between bursts), direct, through nginx and
# through the gateway. Each proxy is started fresh for each round, so its RSS growth is
# what the streams hold. Sourced by bench/run.

CROWD_UP=18230; NGX_CROWD=18231; GW_CROWD=18232
CROWD_SECONDS=${CROWD_SECONDS:-10}
start_bg "$KIT" sse-upstream 127.0.0.1:$CROWD_UP 1000000 1000
cat >"$work/nginx-crowd.conf" <<CONF
worker_processes auto;
pid $work/nginx-crowd.pid;
error_log $work/nginx-crowd.err warn;
worker_rlimit_nofile $nofile;
events { worker_connections $nofile; }
http {
  access_log off;
  upstream sse { server 127.0.0.1:$CROWD_UP; keepalive 128; }
  server {
    listen 127.0.0.1:$NGX_CROWD backlog=4096;
    location / { proxy_pass http://sse; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; proxy_request_buffering off; proxy_read_timeout 1h; }
  }
}
CONF
sleep 0.5
kib() { local total=0 pid; for pid in "$@"; do total=$((total + $(rss "$pid"))); done; echo "$total"; }
crowd_round() { # NAME PORT PID... -> one JSON line, with the proxy's RSS before and while holding
    local name=$1 port=$2; shift 2
    local before held out=$work/crowd-$name.out
    before=$(if [ $# -gt 0 ]; then kib "$@"; else echo 0; fi)
    "$KIT" crowd "http://127.0.0.1:$port/v1/chat/completions" "$STREAMS" "$CROWD_SECONDS" >"$out" &
    local client=$!
    for _ in $(seq 600); do grep -q holding "$out" 2>/dev/null && break; sleep 0.1; done
    # Halfway through the window: every stream open and sending.
    sleep $((CROWD_SECONDS / 2))
    held=$(if [ $# -gt 0 ]; then kib "$@"; else echo 0; fi)
    wait "$client" || true
    tail -n1 "$out" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["rss_before_kib"]=int(sys.argv[1]); r["rss_held_kib"]=int(sys.argv[2]); print(json.dumps(r))' "$before" "$held"
}
crowd_gateway() { # BINARY -> pid, a fresh gateway on $GW_CROWD
    gateway $GW_CROWD http://127.0.0.1:$CROWD_UP routes.toml true 0 "$1"
}
stop() { kill "$@" 2>/dev/null; for _ in $(seq 100); do kill -0 "$@" 2>/dev/null || return 0; sleep 0.1; done; }
for _ in $(seq "$ROUNDS"); do
    crowd_round direct $CROWD_UP >>"$work/crowd-direct"
    nginx -c "$work/nginx-crowd.conf"; sleep 0.5
    # shellcheck disable=SC2046 # one pid per word
    crowd_round nginx $NGX_CROWD $(pgrep -P "$(cat "$work/nginx-crowd.pid")") >>"$work/crowd-nginx"
    nginx -c "$work/nginx-crowd.conf" -s stop 2>/dev/null; sleep 1
    pid=$(crowd_gateway "$GW"); sleep 1
    crowd_round gw $GW_CROWD "$pid" >>"$work/crowd-gw"; stop "$pid"
    if [ -n "$BASELINE" ]; then
        pid=$(crowd_gateway "$BASELINE"); sleep 1
        crowd_round base $GW_CROWD "$pid" >>"$work/crowd-base"; stop "$pid"
    fi
done
crowd_table() {
    python3 - "$work" "$STREAMS" "$CROWD_SECONDS" <<'PY'
import json, os, statistics, sys
work, streams, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def runs(name):
    path = os.path.join(work, "crowd-" + name)
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []
def med(rs, key):
    return statistics.median(r[key] for r in rs)
direct = runs("direct")
print(f"\n| {streams:,} SSE streams open at once, an event a second each; lag over {seconds} s with all open | per-stream RSS (KiB) | time to open all (ms) | errors | lag p50 (µs) | lag p99 (µs) | added p99 (µs) |")
print("|---|---|---|---|---|---|---|")
for name, label in (("direct", "direct"), ("nginx", "nginx (two workers)"), ("gw", "oa-bypass"), ("base", "BASELINE")):
    rs = runs(name)
    if not rs:
        continue
    per = "" if name == "direct" else "%.1f" % med([dict(x=(r["rss_held_kib"] - r["rss_before_kib"]) / max(r["opened"], 1)) for r in rs], "x")
    errors = sum(r["errors"] for r in rs)
    added = "" if name == "direct" else "%+d" % (med(rs, "lag_p99_us") - med(direct, "lag_p99_us"))
    print(f"| {label} | {per} | {med(rs, 'open_ms'):.0f} | {errors} | {med(rs, 'lag_p50_us'):.0f} | {med(rs, 'lag_p99_us'):.0f} | {added} |")
PY
}
