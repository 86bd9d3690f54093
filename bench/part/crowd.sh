# bench/run, part "crowd": thousands of event streams open at once, each sent a ~200-byte
# event every 500 ms, direct, through nginx and through the gateway. Each proxy is started
# fresh for each round, so its RSS growth is what the streams hold: read once every stream
# has its first event, and again after CROWD_SECONDS (40) of events, the steady state. Then
# the same crowd from an HTTPS upstream (nginx terminating TLS in front of the same event
# source, HTTP/1.1 and HTTP/2 by ALPN with its default limit of 128 streams per connection):
# nginx with `proxy_pass https://`, the gateway with `upstream.http2 = false` and with the
# default. CROWD_READS="all first" (the default) runs every round twice: clients reading
# every event, then clients that stop reading after the first. The client opens at most 256
# streams at a time; CROWD_OPENING=N lifts that (N = STREAMS: all at once, as an asyncio
# client does). Sourced by bench/run.

CROWD_UP=18230; NGX_CROWD=18231; GW_CROWD=18232; CROWD_TLS=18233; NGX_CROWD_TLS=18234
CROWD_SECONDS=${CROWD_SECONDS:-40}
CROWD_READS=${CROWD_READS:-all first}
start_bg "$KIT" sse-upstream 127.0.0.1:$CROWD_UP 1000000 500
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
tls_files
# One worker: it holds both sides of every stream of the HTTP/1.1 rows (two descriptors each).
cat >"$work/nginx-crowd-tls-up.conf" <<CONF
worker_processes 1;
pid $work/nginx-crowd-tls-up.pid;
error_log $work/nginx-crowd-tls-up.err warn;
worker_rlimit_nofile $nofile;
events { worker_connections $nofile; }
http {
  access_log off;
  ssl_certificate $work/tls/up.pem; ssl_certificate_key $work/tls/up.key;
  upstream sse { server 127.0.0.1:$CROWD_UP; keepalive 128; }
  server {
    listen 127.0.0.1:$CROWD_TLS ssl http2 backlog=4096;
    location / { proxy_pass http://sse; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; proxy_request_buffering off; proxy_read_timeout 1h; }
  }
}
CONF
cat >"$work/nginx-crowd-tls.conf" <<CONF
worker_processes auto;
pid $work/nginx-crowd-tls.pid;
error_log $work/nginx-crowd-tls.err warn;
worker_rlimit_nofile $nofile;
events { worker_connections $nofile; }
http {
  access_log off;
  upstream tls { server 127.0.0.1:$CROWD_TLS; keepalive 128; }
  server {
    listen 127.0.0.1:$NGX_CROWD_TLS backlog=4096;
    location / { proxy_pass https://tls; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; proxy_request_buffering off; proxy_read_timeout 1h;
                 proxy_ssl_session_reuse on; proxy_ssl_server_name on; proxy_ssl_name localhost;
                 proxy_ssl_verify on; proxy_ssl_trusted_certificate $work/tls/ca.pem; }
  }
}
CONF
nginx -c "$work/nginx-crowd-tls-up.conf"
sleep 0.5
kib() { local total=0 pid; for pid in "$@"; do total=$((total + $(rss "$pid"))); done; echo "$total"; }
crowd_round() { # NAME PORT PID... -> one JSON line: the proxy's RSS before, at the first
    # event of every stream, and after CROWD_SECONDS of events ($read: all or first)
    local name=$1 port=$2; shift 2
    local before held steady out=$work/crowd-$name.out
    before=$(if [ $# -gt 0 ]; then kib "$@"; else echo 0; fi)
    "$KIT" crowd "http://127.0.0.1:$port/v1/chat/completions" "$STREAMS" "$CROWD_SECONDS" "$read" >"$out" &
    local client=$!
    for _ in $(seq 600); do grep -q holding "$out" 2>/dev/null && break; sleep 0.1; done
    held=$(if [ $# -gt 0 ]; then kib "$@"; else echo 0; fi)
    sleep $((CROWD_SECONDS - 2))
    steady=$(if [ $# -gt 0 ]; then kib "$@"; else echo 0; fi)
    wait "$client" || true
    tail -n1 "$out" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["rss_before_kib"], r["rss_held_kib"], r["rss_steady_kib"] = map(int, sys.argv[1:]); print(json.dumps(r))' "$before" "$held" "$steady"
}
crowd_gateway() { # BINARY [BASE_URL] -> pid, a fresh gateway on $GW_CROWD
    SSL_CERT_FILE=$work/tls/ca.pem gateway $GW_CROWD "${2:-http://127.0.0.1:$CROWD_UP}" routes.toml true 0 "$1"
}
stop() { kill "$@" 2>/dev/null; for _ in $(seq 100); do kill -0 "$@" 2>/dev/null || return 0; sleep 0.1; done; }
for _ in $(seq "$ROUNDS"); do for read in $CROWD_READS; do
    crowd_round direct $CROWD_UP >>"$work/crowd-direct-$read"
    nginx -c "$work/nginx-crowd.conf"; sleep 0.5
    # shellcheck disable=SC2046 # one pid per word
    crowd_round nginx $NGX_CROWD $(pgrep -P "$(cat "$work/nginx-crowd.pid")") >>"$work/crowd-nginx-$read"
    nginx -c "$work/nginx-crowd.conf" -s stop 2>/dev/null; sleep 1
    pid=$(crowd_gateway "$GW"); sleep 1
    crowd_round gw $GW_CROWD "$pid" >>"$work/crowd-gw-$read"; stop "$pid"
    if [ -n "$BASELINE" ]; then
        pid=$(crowd_gateway "$BASELINE"); sleep 1
        crowd_round base $GW_CROWD "$pid" >>"$work/crowd-base-$read"; stop "$pid"
    fi
    nginx -c "$work/nginx-crowd-tls.conf"; sleep 0.5
    # shellcheck disable=SC2046 # one pid per word
    crowd_round nginx_tls $NGX_CROWD_TLS $(pgrep -P "$(cat "$work/nginx-crowd-tls.pid")") >>"$work/crowd-nginx_tls-$read"
    nginx -c "$work/nginx-crowd-tls.conf" -s stop 2>/dev/null; sleep 1
    pid=$(OA_BYPASS_UPSTREAM__HTTP2=false crowd_gateway "$GW" "https://localhost:$CROWD_TLS"); sleep 1
    crowd_round gw_tls1 $GW_CROWD "$pid" >>"$work/crowd-gw_tls1-$read"; stop "$pid"
    pid=$(crowd_gateway "$GW" "https://localhost:$CROWD_TLS"); sleep 1
    crowd_round gw_tls2 $GW_CROWD "$pid" >>"$work/crowd-gw_tls2-$read"; stop "$pid"
done; done
nginx -c "$work/nginx-crowd-tls-up.conf" -s stop 2>/dev/null
crowd_table() {
    python3 - "$work" "$STREAMS" "$CROWD_SECONDS" "$CROWD_READS" <<'PY'
import json, os, statistics, sys
work, streams, seconds, reads = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split()
def runs(name):
    path = os.path.join(work, "crowd-" + name)
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []
def med(rs, key):
    return statistics.median(r[key] for r in rs)
def per_stream(rs, at):
    return "%.1f" % statistics.median((r[at] - r["rss_before_kib"]) / max(r["opened"], 1) for r in rs)
for read in reads:
    direct = runs("direct-" + read)
    who = "clients read every event" if read == "all" else "clients stop reading after the first event"
    print(f"\n| {streams:,} SSE streams open at once, an event every 500 ms; {who} | RSS per stream at first event (KiB) | after {seconds} s (KiB) | time to open all (ms) | errors | lag p50 (µs) | lag p99 (µs) | added p99 (µs) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label in (("direct", "direct"), ("nginx", "nginx (two workers)"), ("gw", "oa-bypass"), ("base", "BASELINE"),
                        ("nginx_tls", "HTTPS upstream: nginx, `proxy_pass https://` (HTTP/1.1)"),
                        ("gw_tls1", "HTTPS upstream: oa-bypass, `upstream.http2 = false`"),
                        ("gw_tls2", "HTTPS upstream: oa-bypass, default (HTTP/2)")):
        rs = runs(name + "-" + read)
        if not rs:
            continue
        first = "" if name == "direct" else per_stream(rs, "rss_held_kib")
        steady = "" if name == "direct" else per_stream(rs, "rss_steady_kib")
        errors = sum(r["errors"] for r in rs)
        lags = read == "all"
        p50 = "%.0f" % med(rs, "lag_p50_us") if lags else ""
        p99 = "%.0f" % med(rs, "lag_p99_us") if lags else ""
        added = "%+d" % (med(rs, "lag_p99_us") - med(direct, "lag_p99_us")) if lags and name != "direct" else ""
        print(f"| {label} | {first} | {steady} | {med(rs, 'open_ms'):.0f} | {errors} | {p50} | {p99} | {added} |")
if runs("nginx_tls-all"):
    print("\nHTTPS rows: the event source sits behind nginx terminating TLS, whose hop is in their lag.")
PY
}
