# bench/run, part "https": the gateway and nginx in front of an HTTPS upstream (nginx with a
# certificate from a CA made for the run). The gateway trusts it through SSL_CERT_FILE; nginx
# verifies it too, keeps connections alive and reuses TLS sessions. The upstream keeps a
# connection for any number of requests, so the rounds measure the steady state, not
# handshakes. Sourced by bench/run, which provides $work, gateway(), rps(), col(), ratio().

TLS_UP=18210; TLS_UP2=18211; NGX_TLS=18212; GW_TLS=18213; GW_TLS2=18214; GW_TLS_RAW=18217
GW_TLS_BASE=18215; GW_TLS2_BASE=18216
tls_files
# HTTP/1.1 on one port; HTTP/2 by ALPN on the other (nginx 1.22 spells it on `listen`).
cat >"$work/nginx-tls-up.conf" <<CONF
worker_processes 1;
pid $work/nginx-tls-up.pid;
error_log $work/nginx-tls-up.err warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 100000000;
  ssl_certificate $work/tls/up.pem; ssl_certificate_key $work/tls/up.key;
  ssl_session_cache shared:up:10m;
  server { listen 127.0.0.1:$TLS_UP ssl;
           location / { default_type application/json; return 200 '$canned'; } }
  server { listen 127.0.0.1:$TLS_UP2 ssl http2;
           location / { default_type application/json; return 200 '$canned'; } }
}
CONF
# nginx speaks only HTTP/1.1 to its upstreams, so it has no HTTP/2 row.
cat >"$work/nginx-tls-proxy.conf" <<CONF
worker_processes auto;
pid $work/nginx-tls-proxy.pid;
error_log $work/nginx-tls-proxy.err warn;
events { worker_connections 8192; }
http {
  access_log off;
  upstream tls { server 127.0.0.1:$TLS_UP; keepalive 128; keepalive_requests 100000000; }
  server {
    listen 127.0.0.1:$NGX_TLS;
    location / { proxy_pass https://tls; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; proxy_request_buffering off;
                 proxy_ssl_session_reuse on; proxy_ssl_server_name on; proxy_ssl_name localhost;
                 proxy_ssl_verify on; proxy_ssl_trusted_certificate $work/tls/ca.pem; }
  }
}
CONF
nginx -c "$work/nginx-tls-up.conf"
nginx -c "$work/nginx-tls-proxy.conf"
export SSL_CERT_FILE=$work/tls/ca.pem
# upstream.http2 = false: HTTP/1.1 on the gateway's own transport, as nginx speaks.
gw_tls_raw_pid=$(OA_BYPASS_UPSTREAM__HTTP2=false gateway $GW_TLS_RAW https://localhost:$TLS_UP)
# The default (http2 = true): HTTP/2 where offered, else HTTP/1.1 on hyper's client.
gw_tls_pid=$(gateway $GW_TLS https://localhost:$TLS_UP)
gw_tls2_pid=$(gateway $GW_TLS2 https://localhost:$TLS_UP2)
tls_ports=(); tls_base_ports=()
if [ -n "$BASELINE" ]; then
    base_tls_pid=$(gateway $GW_TLS_BASE https://localhost:$TLS_UP routes.toml true 0 "$BASELINE")
    base_tls2_pid=$(gateway $GW_TLS2_BASE https://localhost:$TLS_UP2 routes.toml true 0 "$BASELINE")
    tls_base_ports=($GW_TLS_BASE $GW_TLS2_BASE)
fi
unset SSL_CERT_FILE
sleep 1
# The gateway's answer must be the upstream's, over TLS, before anything is timed.
for port in $GW_TLS_RAW $GW_TLS $GW_TLS2 $NGX_TLS "${tls_base_ports[@]}"; do
    curl -sf -H "Authorization: Bearer sk-bench" -H "Content-Type: application/json" -d '{}' \
        "http://127.0.0.1:$port/v1/chat/completions" | grep -q chatcmpl-bench \
        || { echo "https part: no answer through port $port" >&2; exit 1; }
done
ngx_tls_workers=$(pgrep -P "$(cat "$work/nginx-tls-proxy.pid")" | tr '\n' ' ')
for port in $NGX_TLS $GW_TLS_RAW $GW_TLS $GW_TLS2 "${tls_base_ports[@]}"; do
    wrk -t1 -c64 -d2s -s "$work/post.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
done
for _ in $(seq "$ROUNDS"); do
    # Straight to the upstream, wrk speaking TLS itself: what the upstream can give.
    wrk -t1 -c64 -d"${DURATION}s" -s "$work/post.lua" "https://localhost:$TLS_UP/v1/chat/completions" \
        | awk '/Requests\/sec/ {print $2}' >>"$work/tls-direct"
    # shellcheck disable=SC2086 # one pid per word
    rps $NGX_TLS $ngx_tls_workers >>"$work/tls-nginx"
    rps $GW_TLS_RAW "$gw_tls_raw_pid" >>"$work/tls-gw-raw"
    rps $GW_TLS "$gw_tls_pid" >>"$work/tls-gw"
    rps $GW_TLS2 "$gw_tls2_pid" >>"$work/tls-gw2"
    if [ -n "$BASELINE" ]; then
        rps $GW_TLS_BASE "$base_tls_pid" >>"$work/tls-base"
        rps $GW_TLS2_BASE "$base_tls2_pid" >>"$work/tls-base2"
    fi
done
https_table() {
    local n_rps n_cpu n_user
    n_rps=$(col 1 "$work/tls-nginx"); n_cpu=$(col 2 "$work/tls-nginx"); n_user=$(col 3 "$work/tls-nginx")
    cat <<TABLE

| HTTPS upstream (TLS 1.3, kept alive; wrk -t1 -c64 to each proxy) | req/s | / nginx | CPU per request (µs) | / nginx | of which user space (µs) | / nginx |
|---|---|---|---|---|---|---|
| direct (wrk speaks TLS to the upstream itself) | $(median <"$work/tls-direct") | | | | | |
| nginx, \`proxy_pass https://\`, HTTP/1.1, keepalive, \`proxy_ssl_session_reuse on\` | $n_rps | 1.00 | $n_cpu | 1.00 | $n_user | 1.00 |
TABLE
    local name file
    for name in "oa-bypass, \`upstream.http2 = false\`: HTTP/1.1 on its own transport:tls-gw-raw" \
        "oa-bypass, default: HTTP/2 (the upstream offers it):tls-gw2" \
        "oa-bypass, default, an upstream without HTTP/2: HTTP/1.1 on hyper's client:tls-gw" \
        "BASELINE, default: HTTP/2:tls-base2" "BASELINE, an upstream without HTTP/2:tls-base"; do
        file=$work/${name##*:}
        [ -s "$file" ] || continue
        echo "| ${name%:*} | $(col 1 "$file") | $(ratio "$(col 1 "$file")" "$n_rps") | $(col 2 "$file") | $(ratio "$(col 2 "$file")" "$n_cpu") | $(col 3 "$file") | $(ratio "$(col 3 "$file")" "$n_user") |"
    done
}
