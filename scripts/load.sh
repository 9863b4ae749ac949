#!/usr/bin/env bash
# Loopback load test: requests per second of examples/load_server.rs without (`bare`) and with
# (`layer`) CancellationLayer, over HTTP/1.1 (wrk) and HTTP/2 (h2load, prior knowledge).
#
# Each round starts the server once per variant and runs both tools against it; the order of
# the variants alternates from round to round so that drift on the machine (thermal, noisy
# neighbours) touches both alike. Prints a Markdown table of medians and the layer/bare ratio.
#
# VARIANTS adds `hand-written` (tonic's cancellation example: a token and a drop guard, nothing
# else) or `peer-watch` (the layer, each connection watched by `tcp::PeerWatch`) to
# `bare layer`, measured in the same rounds.
#
# Usage: scripts/load.sh                     # DURATION=10 s per run, ROUNDS=3: about 2 min
#        VARIANTS="bare layer hand-written" scripts/load.sh
#        DURATION=3 ROUNDS=1 scripts/load.sh # quick run
#        PORT=3100 scripts/load.sh           # if 3000 is taken
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10}" # seconds per tool run
ROUNDS="${ROUNDS:-3}"
read -r -a VARIANT_LIST <<<"${VARIANTS:-bare layer}"
PORT="${PORT:-3000}"
CONNECTIONS=32
STREAMS=10 # concurrent HTTP/2 streams per connection (h2load -m)
URL="http://127.0.0.1:${PORT}/"

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing load generators; install them with:" >&2
  echo "  apt-get install -y ${missing[*]}" >&2
  exit 1
fi

cargo build --release --example load_server
target_dir=$(cargo metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
server_bin="${target_dir}/release/examples/load_server"
[ -x "$server_bin" ] || { echo "not built: $server_bin" >&2; exit 1; }

# On 2 cores or more, server and load generator each get a core of their own, so that they
# do not take turns on one (which would measure the scheduler more than the server).
server_pin=()
client_pin=()
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
  server_pin=(taskset -c 1)
  client_pin=(taskset -c 0)
  pinning="server pinned to CPU 1, load generator to CPU 0 (taskset)"
else
  pinning="not pinned (needs taskset and 2 cores): server and load generator share the CPUs"
fi

server_pid=""
server_log=$(mktemp)
stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap 'stop_server; rm -f "$server_log"' EXIT

start_server() { # $1: bare | layer | hand-written
  PORT="$PORT" "${server_pin[@]}" "$server_bin" "$1" >"$server_log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do
    grep -q '^listening on ' "$server_log" && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "load_server $1 did not start:" >&2
  cat "$server_log" >&2
  exit 1
}

# Each prints requests/second; errors the tool reports fail the run.
run_wrk() {
  local out
  out=$("${client_pin[@]}" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "$URL")
  if grep -qE 'Non-2xx|Socket errors' <<<"$out"; then
    echo "wrk reported errors:" >&2
    echo "$out" >&2
    exit 1
  fi
  awk '/^Requests\/sec:/ { print $2 }' <<<"$out"
}

run_h2load() {
  local out
  out=$("${client_pin[@]}" h2load -c "$CONNECTIONS" -m "$STREAMS" -t 1 -D "$DURATION" "$URL")
  if ! grep -qE '^requests: .* 0 failed, 0 errored' <<<"$out" ||
    ! grep -qE '^status codes: [0-9]+ 2xx, 0 3xx, 0 4xx, 0 5xx' <<<"$out"; then
    echo "h2load reported errors:" >&2
    echo "$out" >&2
    exit 1
  fi
  # "finished in 10.00s, 123456.70 req/s, 4.12MB/s"
  sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' <<<"$out"
}

median() {
  printf '%s\n' "$@" | sort -g |
    awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

declare -A results # "<variant> <protocol>" -> space-separated req/s of each round

echo "Load test: ${ROUNDS} round(s), ${DURATION} s per run, ${CONNECTIONS} connections; ${pinning}."
echo "CPU: $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1), $(nproc) cores."
echo
started=$SECONDS
for round in $(seq "$ROUNDS"); do
  # The order alternates from round to round.
  variants=("${VARIANT_LIST[@]}")
  if [ $((round % 2)) -eq 0 ]; then
    for ((i = 0, j = ${#variants[@]} - 1; i < j; i++, j--)); do
      t=${variants[i]}
      variants[i]=${variants[j]}
      variants[j]=$t
    done
  fi
  for variant in "${variants[@]}"; do
    start_server "$variant"
    h1=$(run_wrk)
    h2=$(run_h2load)
    stop_server
    results["$variant h1"]+="$h1 "
    results["$variant h2"]+="$h2 "
    printf 'round %s/%s %-12s  HTTP/1.1 %10.0f req/s   HTTP/2 %10.0f req/s\n' \
      "$round" "$ROUNDS" "$variant" "$h1" "$h2"
  done
done

echo
echo "| protocol | variant | bare req/s (median) | variant req/s (median) | variant / bare | per-round variant / bare (min–max) |"
echo "|---|---|---|---|---|---|"
for protocol in h1 h2; do
 for variant in "${VARIANT_LIST[@]}"; do
  [ "$variant" = bare ] && continue
  bare_runs=${results["bare $protocol"]}
  layer_runs=${results["$variant $protocol"]}
  # shellcheck disable=SC2086 # the lists are space-separated on purpose
  bare=$(median $bare_runs)
  # shellcheck disable=SC2086
  layer=$(median $layer_runs)
  case $protocol in
    h1) label="HTTP/1.1 (wrk -t1 -c${CONNECTIONS})" ;;
    h2) label="HTTP/2 (h2load -t1 -c${CONNECTIONS} -m${STREAMS})" ;;
  esac
  # The spread of the per-round ratios shows how much of the difference is noise.
  awk -v label="$label" -v variant="$variant" -v bare="$bare" -v layer="$layer" \
    -v bare_runs="$bare_runs" -v layer_runs="$layer_runs" 'BEGIN {
      n = split(bare_runs, b, " "); split(layer_runs, l, " ")
      for (i = 1; i <= n; i++) {
        r = l[i] / b[i]
        if (i == 1 || r < lo) lo = r
        if (i == 1 || r > hi) hi = r
      }
      printf "| %s | %s | %.0f | %.0f | %.3f | %.2f–%.2f |\n", label, variant, bare, layer, layer / bare, lo, hi
    }'
 done
done
echo
echo "GET / answering \"hello\" (examples/load_server.rs, release build); loopback; medians of ${ROUNDS} round(s)."
echo "Target: layer / bare ≥ 0.97. ${pinning^}. Total: $((SECONDS - started)) s."
