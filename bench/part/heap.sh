# bench/run, part "heap": a heap profile of the gateway holding $STREAMS event streams, taken
# with heaptrack on the release build with line tables (cargo's `profiling` profile). Prints
# the heap at its peak and the ten call sites that held most of it then; the whole report is
# kept as $HEAP_REPORT (default /tmp/oa-bypass-heap.txt). Sourced by bench/run.

HEAP_UP=18240; GW_HEAP=18241
HEAP_REPORT=${HEAP_REPORT:-/tmp/oa-bypass-heap.txt}
cargo build --profile profiling --quiet --bin oa-bypass
start_bg "$KIT" sse-upstream 127.0.0.1:$HEAP_UP 1000000 1000
OA_BYPASS_SERVER__HOST=127.0.0.1 OA_BYPASS_SERVER__PORT=$GW_HEAP \
    OA_BYPASS_UPSTREAM__BASE_URL=http://127.0.0.1:$HEAP_UP RUST_LOG=warn \
    setsid heaptrack -o "$work/heap" target/profiling/oa-bypass >"$work/heap.log" 2>&1 </dev/null &
heap_tracker=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$GW_HEAP/health" >/dev/null && break; sleep 0.2; done
"$KIT" crowd "http://127.0.0.1:$GW_HEAP/v1/chat/completions" "$STREAMS" 4 >"$work/heap-crowd.out"
# heaptrack writes its file when the gateway exits; SIGTERM lets it finish gracefully.
pkill -TERM -f "^target/profiling/oa-bypass" || true
wait "$heap_tracker" || true
heaptrack_print -f "$work"/heap*.zst --print-peaks 1 --print-allocators 0 --print-temporary 0 \
    --print-leaks 0 --peak-limit 10 --sub-peak-limit 2 >"$HEAP_REPORT" 2>&1 || true
heap_table() {
    python3 - "$HEAP_REPORT" "$(awk '/^holding/ {print $2}' "$work/heap-crowd.out")" <<'PY'
import re, sys
report, held = open(sys.argv[1]).read().splitlines(), int(sys.argv[2] or 0)
ours = re.compile(r"^\s+at src/(app|main|lib|headers|engine|pipeline|upstream|observe|http1|config|routes|store|realtime|openapi)\b")
units = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
def size(text):
    m = re.match(r"([0-9.]+)([KMG]?)", text)
    return float(m.group(1)) * units[m.group(2)]
print(f"\nHeap of the gateway holding {held:,} streams (heaptrack; whole report: {sys.argv[1]}):\n")
for line in report:
    if line.startswith(("peak heap memory consumption", "peak RSS")):
        print("    " + line)
# Each backtrace heaptrack merges under a peak: its bytes at the peak, its calls, and the
# innermost frame in the gateway's own code.
rows, current = [], None
for line in report:
    m = re.match(r"^([0-9.]+[KMG]?B?) consumed over (\d+) calls from:", line)
    if m:
        current = [size(m.group(1)), int(m.group(2)), None]
        rows.append(current)
    elif current and current[2] is None and ours.match(line):
        current[2] = line.strip()[3:]
rows.sort(key=lambda r: -r[0])
print("\n| held at the peak | calls | per stream | where (first frame in the gateway's code) |")
print("|---|---|---|---|")
for total, calls, where in rows[:12]:
    per = f"{total / held / 1024:.2f} KiB" if held else ""
    print(f"| {total / 1024 ** 2:.2f} MiB | {calls:,} | {per} | {where or '(outside the gateway: runtime, libraries)'} |")
PY
}
