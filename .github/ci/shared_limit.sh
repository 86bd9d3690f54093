#!/usr/bin/env bash
# Two replicas that share [limits] through Redis: both answer, and one key's 4 requests a
# minute are spent across both. Usage: shared_limit.sh PORT_A PORT_B
set -euo pipefail
a=$1 b=$2

chat() { # port key -> HTTP status
    curl --silent --output /dev/null --write-out '%{http_code}' \
        "http://127.0.0.1:$1/v1/chat/completions" \
        -H "Authorization: Bearer $2" -H "Content-Type: application/json" \
        -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
}
expect() { # what wanted got
    echo "$1: $3"
    if [ "$3" != "$2" ]; then
        echo "expected $2" >&2
        exit 1
    fi
}

for port in "$a" "$b"; do
    expect "replica :$port /health" 200 \
        "$(curl --silent --output /dev/null --write-out '%{http_code}' "http://127.0.0.1:$port/health")"
done
# Two on each replica spend the key's four (the bucket refills one per 15 s)...
for port in "$a" "$a" "$b" "$b"; do
    expect "key A on :$port" 200 "$(chat "$port" sk-ci-key-a)"
done
# ...so the fifth is refused on either replica: each alone would still have two left.
expect "key A on :$a, fifth" 429 "$(chat "$a" sk-ci-key-a)"
expect "key A on :$b, sixth" 429 "$(chat "$b" sk-ci-key-a)"
# Another key is untouched: the limit is per key, not a replica refusing everything.
expect "key B on :$b" 200 "$(chat "$b" sk-ci-key-b)"
