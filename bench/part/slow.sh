# bench/run, part "slow": an upstream that answers 20 ms after each request (a 1.4 KB chat
# answer), at 256 and at 1,024 connections: direct, through nginx, through the gateway.
# Closed loop, so the ideal is connections / 20 ms; what a proxy costs shows as lost
# throughput and added p99. Sourced by bench/run.

SLOW_UP=18220; NGX_SLOW=18221; GW_SLOW=18222; GW_SLOW_BASE=18223; GW_SLOW_256=18224
start_bg "$KIT" slow-upstream 127.0.0.1:$SLOW_UP 20
cat >"$work/nginx-slow.conf" <<CONF
worker_processes auto;
pid $work/nginx-slow.pid;
error_log $work/nginx-slow.err warn;
worker_rlimit_nofile 8192;
events { worker_connections 4096; }
http {
  access_log off;
  upstream slow { server 127.0.0.1:$SLOW_UP; keepalive 1024; }
  server {
    listen 127.0.0.1:$NGX_SLOW backlog=4096;
    location / { proxy_pass http://slow; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; proxy_request_buffering off; }
  }
}
CONF
nginx -c "$work/nginx-slow.conf"
# As nginx's `keepalive 1024`; and the default (256) beside it.
OA_BYPASS_UPSTREAM__MAX_IDLE_CONNECTIONS=1024 gateway $GW_SLOW http://127.0.0.1:$SLOW_UP >/dev/null
gateway $GW_SLOW_256 http://127.0.0.1:$SLOW_UP >/dev/null
slow_ports=($SLOW_UP $NGX_SLOW $GW_SLOW $GW_SLOW_256)
if [ -n "$BASELINE" ]; then
    gateway $GW_SLOW_BASE http://127.0.0.1:$SLOW_UP routes.toml true 0 "$BASELINE" >/dev/null
    slow_ports+=($GW_SLOW_BASE)
fi
sleep 1
# wrk's latency in µs: it prints 850.00us, 20.31ms or 1.02s.
to_us() { awk '{v = $1 + 0; if ($1 ~ /ms$/) v *= 1000; else if ($1 ~ /[0-9]s$/) v *= 1000000; printf "%.0f\n", v}'; }
slow_round() { # CONNECTIONS PORT -> "req/s p50_us p99_us errors"
    local out
    out=$(wrk -t1 -c"$1" -d"${DURATION}s" --latency -s "$work/post.lua" "http://127.0.0.1:$2/v1/chat/completions")
    printf '%s %s %s %s\n' "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
        "$(awk '$1 == "50%" {print $2}' <<<"$out" | to_us)" \
        "$(awk '$1 == "99%" {print $2}' <<<"$out" | to_us)" \
        "$(awk '/Non-2xx|Socket errors/ {e = 1} END {print e + 0}' <<<"$out")"
}
for conns in 256 1024; do
    for port in "${slow_ports[@]}"; do wrk -t1 -c"$conns" -d2s -s "$work/post.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null; done
    for _ in $(seq "$ROUNDS"); do
        for port in "${slow_ports[@]}"; do slow_round "$conns" "$port" >>"$work/slow-$conns-$port"; done
    done
done
slow_table() {
    local conns d_rps d99 port name
    cat <<TABLE

| 20 ms upstream, wrk -t1 closed loop | connections | req/s | / direct | p50 (ms) | p99 (ms) | added p99 (ms) | runs with errors |
|---|---|---|---|---|---|---|---|
TABLE
    for conns in 256 1024; do
        d_rps=$(col 1 "$work/slow-$conns-$SLOW_UP"); d99=$(col 3 "$work/slow-$conns-$SLOW_UP")
        for port in "${slow_ports[@]}"; do
            case $port in
                $SLOW_UP) name=direct ;; $NGX_SLOW) name="nginx, keepalive 1024" ;;
                $GW_SLOW) name="oa-bypass, max_idle_connections = 1024" ;;
                $GW_SLOW_256) name="oa-bypass, default (256)" ;; *) name=BASELINE ;;
            esac
            local f=$work/slow-$conns-$port
            awk -v name="$name" -v c="$conns" -v rps="$(col 1 "$f")" -v d="$d_rps" -v p50="$(col 2 "$f")" \
                -v p99="$(col 3 "$f")" -v d99="$d99" -v errs="$(awk '{s += $4} END {print s + 0}' "$f")" \
                'BEGIN {printf "| %s | %s | %s | %.3f | %.2f | %.2f | %+.2f | %s |\n", name, c, rps, rps / d, p50 / 1000, p99 / 1000, (p99 - d99) / 1000, errs}'
        done
    done
}
