# bench/run, part "loopback": the gateway against nginx, direct, hyper alone and a bare relay,
# on plain HTTP to an upstream that answers at once: throughput and CPU per request, latency
# at concurrency 1, SSE lag, memory, start-up. Sourced by bench/run.

# ── ports and upstreams ──────────────────────────────────────────────────────────────────
UP=18181; NGX=18182; GWP=18183; SSE_UP=18184; NGX_SSE=18185; GW_SSE=18186
HOLD_UP=18187; GW_HOLD=18188; BLOB_UP=18189; GW_BLOB=18190; START_PORT=18191
GWP_NOTAP=18192; GW_SSE_NOTAP=18193; HYPER=18194; GWP_NOLANE=18195
RELAY=18196; RELAY_SSE=18197; NGX1=18198; GWP1=18199; GWP_BASE=18200; GWP_BASE_NOLANE=18201
cat > "$work/nginx-up.conf" <<EOF
worker_processes 1;
pid $work/nginx-up.pid;
error_log $work/nginx-up.err warn;
events { worker_connections 8192; }
http {
  access_log off;
  server {
    listen 127.0.0.1:$UP;
    location / { default_type application/json; return 200 '$canned'; }
  }
}
EOF
cat > "$work/nginx-proxy.conf" <<EOF
worker_processes auto;
pid $work/nginx-proxy.pid;
error_log $work/nginx-proxy.err warn;
events { worker_connections 8192; }
http {
  access_log off;
  upstream api { server 127.0.0.1:$UP; keepalive 128; }
  upstream sse { server 127.0.0.1:$SSE_UP; keepalive 128; }
  server {
    listen 127.0.0.1:$NGX;
    location / { proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; proxy_request_buffering off; }
  }
  server {
    listen 127.0.0.1:$NGX_SSE;
    location / { proxy_pass http://sse; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; proxy_request_buffering off; }
  }
}
EOF
# One worker each: nginx with worker_processes 1, beside the gateway with server.workers = 1.
cat > "$work/nginx-proxy1.conf" <<EOF
worker_processes 1;
pid $work/nginx-proxy1.pid;
error_log $work/nginx-proxy1.err warn;
events { worker_connections 8192; }
http {
  access_log off;
  upstream api { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$NGX1;
    location / { proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; proxy_request_buffering off; }
  }
}
EOF
nginx -c "$work/nginx-up.conf"
nginx -c "$work/nginx-proxy.conf"
nginx -c "$work/nginx-proxy1.conf"

# The shipped manifest (the usage tap on for chat), and a copy without `usage = true` lines:
# the two show what the tap costs.
sed '/^usage = true$/d; /^stream_usage_option = true$/d' routes.toml >"$work/routes-notap.toml"
start_bg "$KIT" sse-upstream 127.0.0.1:$SSE_UP 64 20
start_bg "$KIT" sse-upstream 127.0.0.1:$HOLD_UP 120 1000
start_bg "$KIT" blob-upstream 127.0.0.1:$BLOB_UP
# hyper alone, no gateway on top: what our own layers cost is the gateway minus this.
setsid "$KIT" hyper-proxy 127.0.0.1:$HYPER http://127.0.0.1:$UP >"$work/hyper-proxy.log" 2>&1 </dev/null &
hyper_pid=$!; pids+=("$hyper_pid")
# The floor of one more hop for latency: a bare byte relay, a blocked thread each way.
setsid "$KIT" tcp-relay 127.0.0.1:$RELAY 127.0.0.1:$UP >"$work/relay.log" 2>&1 </dev/null &
pids+=($!)
setsid "$KIT" tcp-relay 127.0.0.1:$RELAY_SSE 127.0.0.1:$SSE_UP >"$work/relay-sse.log" 2>&1 </dev/null &
pids+=($!)
gw_pid=$(gateway $GWP http://127.0.0.1:$UP)
gateway $GW_SSE http://127.0.0.1:$SSE_UP >/dev/null
notap_pid=$(gateway $GWP_NOTAP http://127.0.0.1:$UP "$work/routes-notap.toml")
# The same gateway with server.fast_lane = false: every request through poem and hyper.
nolane_pid=$(gateway $GWP_NOLANE http://127.0.0.1:$UP routes.toml false)
gateway $GW_SSE_NOTAP http://127.0.0.1:$SSE_UP "$work/routes-notap.toml" >/dev/null
hold_pid=$(gateway $GW_HOLD http://127.0.0.1:$HOLD_UP)
blob_pid=$(gateway $GW_BLOB http://127.0.0.1:$BLOB_UP)
gw1_pid=$(gateway $GWP1 http://127.0.0.1:$UP routes.toml true 1)
base_ports=()
if [ -n "$BASELINE" ]; then
    base_pid=$(gateway $GWP_BASE http://127.0.0.1:$UP routes.toml true 0 "$BASELINE")
    base_nolane_pid=$(gateway $GWP_BASE_NOLANE http://127.0.0.1:$UP routes.toml false 0 "$BASELINE")
    base_ports=($GWP_BASE $GWP_BASE_NOLANE)
fi
sleep 1

# ── throughput: wrk -t1 -c64, POST ~200 B JSON with Authorization, interleaved rounds ────
nginx_workers=$(pgrep -P "$(cat "$work/nginx-proxy.pid")" | tr '\n' ' ')
nginx1_worker=$(pgrep -P "$(cat "$work/nginx-proxy1.pid")")
for port in $UP $NGX $GWP $GWP_NOTAP $HYPER $GWP_NOLANE $NGX1 $GWP1 "${base_ports[@]}"; do wrk -t1 -c64 -d2s -s "$work/post.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null; done
: >"$work/rps-direct"; : >"$work/rps-nginx"; : >"$work/rps-gw"; : >"$work/rps-notap"; : >"$work/rps-hyper"
: >"$work/rps-nolane"; : >"$work/rps-nginx1"; : >"$work/rps-gw1"; : >"$work/rps-base"; : >"$work/rps-base-nolane"
for _ in $(seq "$ROUNDS"); do
    rps $UP >>"$work/rps-direct"
    # shellcheck disable=SC2086 # one pid per word
    rps $NGX $nginx_workers >>"$work/rps-nginx"
    rps $GWP "$gw_pid" >>"$work/rps-gw"
    rps $GWP_NOTAP "$notap_pid" >>"$work/rps-notap"
    rps $HYPER "$hyper_pid" >>"$work/rps-hyper"
    rps $GWP_NOLANE "$nolane_pid" >>"$work/rps-nolane"
    rps $NGX1 "$nginx1_worker" >>"$work/rps-nginx1"
    rps $GWP1 "$gw1_pid" >>"$work/rps-gw1"
    if [ -n "$BASELINE" ]; then
        rps $GWP_BASE "$base_pid" >>"$work/rps-base"
        rps $GWP_BASE_NOLANE "$base_nolane_pid" >>"$work/rps-base-nolane"
    fi
done
rps_direct=$(col 1 "$work/rps-direct"); rps_nginx=$(col 1 "$work/rps-nginx"); rps_gw=$(col 1 "$work/rps-gw")
rps_notap=$(col 1 "$work/rps-notap")
cpu_nginx=$(col 2 "$work/rps-nginx"); cpu_gw=$(col 2 "$work/rps-gw"); cpu_notap=$(col 2 "$work/rps-notap")
rps_hyper=$(col 1 "$work/rps-hyper"); cpu_hyper=$(col 2 "$work/rps-hyper")
user_nginx=$(col 3 "$work/rps-nginx"); user_gw=$(col 3 "$work/rps-gw"); user_hyper=$(col 3 "$work/rps-hyper")
rps_nolane=$(col 1 "$work/rps-nolane"); cpu_nolane=$(col 2 "$work/rps-nolane"); user_nolane=$(col 3 "$work/rps-nolane")
rps_nginx1=$(col 1 "$work/rps-nginx1"); cpu_nginx1=$(col 2 "$work/rps-nginx1"); user_nginx1=$(col 3 "$work/rps-nginx1")
rps_gw1=$(col 1 "$work/rps-gw1"); cpu_gw1=$(col 2 "$work/rps-gw1"); user_gw1=$(col 3 "$work/rps-gw1")

# ── latency at concurrency 1 (oha) ───────────────────────────────────────────────────────
# Interleaved rounds, each percentile the median over rounds: one run's p99 is its 50th
# slowest request, and moves by tens of µs from run to run here.
lat() { # PORT -> "p50_us p99_us"
    oha -c 1 -n 5000 --no-tui --output-format json -m POST -T application/json \
        -H "Authorization: Bearer sk-bench" -d '{"model":"gpt-4o-mini","messages":[]}' \
        "http://127.0.0.1:$1/v1/chat/completions" \
        | python3 -c 'import json,sys; p=json.load(sys.stdin)["latencyPercentiles"]; print(round(p["p50"]*1e6), round(p["p99"]*1e6))'
}
for _ in $(seq "$ROUNDS"); do
    for port in $UP $RELAY $NGX $GWP; do lat $port >>"$work/lat-$port"; done
done
lat_median() { printf "%.0f %.0f\n" "$(col 1 "$work/lat-$1")" "$(col 2 "$work/lat-$1")"; }
read -r d50 d99 < <(lat_median $UP); read -r r50 r99 < <(lat_median $RELAY)
read -r n50 n99 < <(lat_median $NGX); read -r g50 g99 < <(lat_median $GWP)

# ── SSE: 64 events 20 ms apart; per-event lag and time to first byte ─────────────────────
# Interleaved rounds, each value the median over rounds: one run of 640 events is noisy.
sse() { "$KIT" sse-client "http://127.0.0.1:$1/v1/chat/completions" 10; }
for _ in $(seq "$ROUNDS"); do
    for port in $SSE_UP $RELAY_SSE $NGX_SSE $GW_SSE $GW_SSE_NOTAP; do sse $port >>"$work/sse-$port"; done
done
sse_median() { python3 - "$work/sse-$1" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
out = {k: statistics.median(r[k] for r in runs) for k in ("lag_p50_us", "lag_p99_us", "ttfb_p50_us")}
out = {k: int(v) for k, v in out.items()}
out["in_order"] = all(r["in_order"] for r in runs)
print(json.dumps(out))
PY
}
sse_direct=$(sse_median $SSE_UP); sse_relay=$(sse_median $RELAY_SSE); sse_nginx=$(sse_median $NGX_SSE)
sse_gw=$(sse_median $GW_SSE); sse_notap=$(sse_median $GW_SSE_NOTAP)
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
added() { echo $(( $(field "$1" "$2") - $(field "$sse_direct" "$2") )); }

# ── memory ───────────────────────────────────────────────────────────────────────────────
idle_rss=$(rss "$hold_pid")
"$KIT" crowd "http://127.0.0.1:$GW_HOLD/v1/chat/completions" 1000 3 >"$work/hold.out" &
hold_client=$!
for _ in $(seq 200); do grep -q holding "$work/hold.out" 2>/dev/null && break; sleep 0.1; done
held_rss=$(rss "$hold_pid")
wait "$hold_client" || true
per_stream=$(awk -v a="$held_rss" -v b="$idle_rss" 'BEGIN {printf "%.1f", (a-b)/1000}')

blob_before=$(rss "$blob_pid"); echo 5 >"/proc/$blob_pid/clear_refs"
truncate -s 1G "$work/big.jsonl"
curl -s -o /dev/null -H "Authorization: Bearer sk-bench" \
    -F "purpose=batch" -F "file=@$work/big.jsonl" "http://127.0.0.1:$GW_BLOB/v1/files"
upload_growth=$(( $(hwm "$blob_pid") - blob_before ))
blob_before=$(rss "$blob_pid"); echo 5 >"/proc/$blob_pid/clear_refs"
curl -s -o /dev/null -H "Authorization: Bearer sk-bench" \
    "http://127.0.0.1:$GW_BLOB/v1/files/file-big/content?bytes=1073741824"
download_growth=$(( $(hwm "$blob_pid") - blob_before ))

# ── start-up and size ────────────────────────────────────────────────────────────────────
for _ in 1 2 3 4 5; do
    "$KIT" startup "$GW" $START_PORT >>"$work/startup"
    if [ -n "$BASELINE" ]; then "$KIT" startup "$BASELINE" $START_PORT >>"$work/startup-base"; fi
done
startup_ms=$(median <"$work/startup")
size_mib=$(awk -v s="$(stat -c %s "$GW")" 'BEGIN {printf "%.1f", s/1048576}')

loopback_table() {
cat <<EOF

| measure | direct | bare relay (floor) | nginx | oa-bypass | oa-bypass / nginx |
|---|---|---|---|---|---|
| throughput, wrk -t1 -c64 (req/s) | $rps_direct | | $rps_nginx | $rps_gw | $(ratio "$rps_gw" "$rps_nginx") |
| proxy CPU per request (µs), same runs | | | $cpu_nginx | $cpu_gw | $(ratio "$cpu_gw" "$cpu_nginx") |
| of which user space (µs) | | | $user_nginx | $user_gw | $(ratio "$user_gw" "$user_nginx") |
| latency c=1 p50 (µs), added over direct | $d50 | +$((r50 - d50)) | +$((n50 - d50)) | +$((g50 - d50)) | |
| latency c=1 p99 (µs), added over direct | $d99 | +$((r99 - d99)) | +$((n99 - d99)) | +$((g99 - d99)) | |
| SSE per-event lag p50 (µs), added over direct | $(field "$sse_direct" lag_p50_us) | +$(added "$sse_relay" lag_p50_us) | +$(added "$sse_nginx" lag_p50_us) | +$(added "$sse_gw" lag_p50_us) | |
| SSE per-event lag p99 (µs), added over direct | $(field "$sse_direct" lag_p99_us) | +$(added "$sse_relay" lag_p99_us) | +$(added "$sse_nginx" lag_p99_us) | +$(added "$sse_gw" lag_p99_us) | |
| SSE time to first byte p50 (µs) | $(field "$sse_direct" ttfb_p50_us) | $(field "$sse_relay" ttfb_p50_us) | $(field "$sse_nginx" ttfb_p50_us) | $(field "$sse_gw" ttfb_p50_us) | |
| SSE events in order | $(field "$sse_direct" in_order) | $(field "$sse_relay" in_order) | $(field "$sse_nginx" in_order) | $(field "$sse_gw" in_order) | |

| one worker each (nginx \`worker_processes 1\`, oa-bypass \`server.workers = 1\`) | nginx | oa-bypass | oa-bypass / nginx |
|---|---|---|---|
| throughput, wrk -t1 -c64 (req/s) | $rps_nginx1 | $rps_gw1 | $(ratio "$rps_gw1" "$rps_nginx1") |
| proxy CPU per request (µs), same runs | $cpu_nginx1 | $cpu_gw1 | $(ratio "$cpu_gw1" "$cpu_nginx1") |
| of which user space (µs) | $user_nginx1 | $user_gw1 | $(ratio "$user_gw1" "$user_nginx1") |

| hyper alone (\`benchkit hyper-proxy\`: no routing, checks, metrics or logs) | req/s | CPU per request (µs) | of which user space (µs) | / nginx |
|---|---|---|---|---|
| hyper's server and hyper-util's pooled client, one runtime per core | $rps_hyper | $cpu_hyper | $user_hyper | $(ratio "$rps_hyper" "$rps_nginx") |

| paths (oa-bypass) | fast lane (shipped) | hyper's path (\`fast_lane = false\`) | lane / hyper's |
|---|---|---|---|
| throughput, wrk -t1 -c64 (req/s) | $rps_gw | $rps_nolane | $(ratio "$rps_gw" "$rps_nolane") |
| CPU per request (µs) | $cpu_gw | $cpu_nolane | $(ratio "$cpu_gw" "$cpu_nolane") |
| of which user space (µs) | $user_gw | $user_nolane | $(ratio "$user_gw" "$user_nolane") |

| usage tap (oa-bypass) | tap on (shipped manifest) | tap off | on / off |
|---|---|---|---|
| throughput, wrk -t1 -c64 (req/s) | $rps_gw | $rps_notap | $(ratio "$rps_gw" "$rps_notap") |
| CPU per request (µs) | $cpu_gw | $cpu_notap | $(ratio "$cpu_gw" "$cpu_notap") |
| SSE per-event lag p50 / p99 (µs) | $(field "$sse_gw" lag_p50_us) / $(field "$sse_gw" lag_p99_us) | $(field "$sse_notap" lag_p50_us) / $(field "$sse_notap" lag_p99_us) | |

| oa-bypass | value |
|---|---|
| idle RSS | $idle_rss KiB |
| RSS with 1,000 open SSE streams | $held_rss KiB ($per_stream KiB per stream) |
| peak RSS growth, 1 GiB multipart upload | $upload_growth KiB |
| peak RSS growth, 1 GiB download | $download_growth KiB |
| start to first served request | $startup_ms ms |
| release binary | $size_mib MiB |
EOF
if [ -n "$BASELINE" ]; then
    base() { col "$1" "$work/rps-base$2"; }
    cat <<EOF

| this build against BASELINE ($BASELINE), same rounds | baseline | this build | this / baseline |
|---|---|---|---|
| fast engine: throughput, wrk -t1 -c64 (req/s) | $(base 1 "") | $rps_gw | $(ratio "$rps_gw" "$(base 1 "")") |
| fast engine: CPU per request (µs) | $(base 2 "") | $cpu_gw | $(ratio "$cpu_gw" "$(base 2 "")") |
| fast engine: of which user space (µs) | $(base 3 "") | $user_gw | $(ratio "$user_gw" "$(base 3 "")") |
| hyper's path: throughput (req/s) | $(base 1 -nolane) | $rps_nolane | $(ratio "$rps_nolane" "$(base 1 -nolane)") |
| hyper's path: CPU per request (µs) | $(base 2 -nolane) | $cpu_nolane | $(ratio "$cpu_nolane" "$(base 2 -nolane)") |
| hyper's path: of which user space (µs) | $(base 3 -nolane) | $user_nolane | $(ratio "$user_nolane" "$(base 3 -nolane)") |
| start to first served request (ms) | $(median <"$work/startup-base") | $startup_ms | |
EOF
fi

}
