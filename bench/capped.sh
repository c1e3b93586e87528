#!/usr/bin/env bash
# Cold misses of a huge layer from an origin that caps every connection (issue 16).
#
# Registries and the CDNs behind them cap what one connection gets, so a cold 5-20 GB layer
# fetched in one stream takes as long as that cap allows. Here the origin is CNCF distribution
# behind `capped-proxy` (bench/capped/main.rs), a TCP proxy that paces every connection on its
# own to the cap (a token bucket with a 10 ms burst), as a CDN's per-connection limit does; Range
# requests and keep-alive pass through untouched. (nginx's `limit_rate` was tried first and is no
# honest cap for ranged clients: it allows every request rate x (elapsed + 1 s), a one-second
# burst per request, so 16 MiB ranges from an origin "capped" at 20 MB/s arrived at several
# hundred MB/s; see docs/benchmarks.md. The fq qdisc's per-flow maxrate is not in this kernel.)
# Per cap (CAPS, MB/s per connection), in rounds:
#   - direct: one single-stream GET of the blob from the capped origin (curl);
#   - larder cold, CLIENTS concurrent clients (fresh process, empty disk; default flags: ranged
#     downloads on), and the same with one client;
#   - larder cold with `--upstream-ranged-connections 1` (one stream, the behaviour before);
#   - distribution's pull-through cache cold (proxy.remoteurl = the capped origin), CLIENTS clients;
#   - larder cold, one client fetching the blob as 4 parallel ranges (curl -r), as containerd 2.x
#     may fetch a layer in parts.
# For each: wall time until every client has the whole blob (MB/s = blob bytes / wall), the
# ratio to the direct GET, the origin's requests for the blob (every range counted, from the
# origin's access log) and the bytes it sent, and the blob's sha256 (one client's bytes go
# through sha256sum).
#
# Usage: bash bench/capped.sh [REPORT.md]
#   needs docker-registry, curl, python3; builds larder (release) and capped-proxy (debug)
# Knobs: CAPS="20 100" (MB/s per connection), MIB=512, RUNS=3, CLIENTS=8,
#   CONFIGS="direct larder larder-one larder-single ptc larder-parts" (what to measure),
#   LARDER_FLAGS (extra flags for every larder), LARDER_BIN (skip the build; LARDER_COMMIT names
#   its source), CAPPED_PROXY (a built capped-proxy), BENCH_TMP (scratch parent, default /tmp).
#   Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
report=${1:-}
CAPS=${CAPS:-"20 100"}
MIB=${MIB:-512}
RUNS=${RUNS:-3}
CLIENTS=${CLIENTS:-8}
LARDER_FLAGS=${LARDER_FLAGS:-}
CONFIGS=${CONFIGS:-"direct larder larder-one larder-single ptc larder-parts"}
REPO=bench/huge

BENCH_NAME=capped
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
for tool in docker-registry curl python3 sha256sum; do
  command -v "$tool" >/dev/null || die "$tool missing: run bash scripts/install-test-deps.sh"
done

if [ -z "${LARDER_BIN:-}" ]; then
  log "building larder (cargo build --release)"
  cargo build --release --locked -q --bin larder
  LARDER_BIN=$ROOT/target/release/larder
fi
[ -x "$LARDER_BIN" ] || die "no larder binary at $LARDER_BIN"
if [ -z "${CAPPED_PROXY:-}" ]; then
  log "building capped-proxy (cargo build -p larder-testkit --bin capped-proxy)"
  cargo build --locked -q -p larder-testkit --bin capped-proxy
  CAPPED_PROXY=${CARGO_TARGET_DIR:-$ROOT/target}/debug/capped-proxy
fi
[ -x "$CAPPED_PROXY" ] || die "no capped-proxy at $CAPPED_PROXY"
COMMIT=${LARDER_COMMIT:-$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)}

work=$(mktemp -d "${BENCH_TMP:-/tmp}/larder-capped.XXXXXX")
results=$work/results.tsv
: >"$results"
ORIGIN_PORT=$(free_port)
trap cleanup EXIT
trap 'exit 130' INT TERM

PTC_PORT=$(free_port); LARDER_PORT=$(free_port); LARDER_METRICS=$(free_port)
CAPPED_PORT=$(free_port)
ORIGIN=127.0.0.1:$CAPPED_PORT  # what every client asks: the origin through the cap


log "making $MIB MiB of random bytes and pushing them to the origin"
head -c "$((MIB << 20))" /dev/urandom >"$work/blob"
HEX=$(sha256sum "$work/blob" | cut -d' ' -f1)
BYTES=$((MIB << 20))
start_registry origin "127.0.0.1:$ORIGIN_PORT"
location=$(curl -sf -X POST -D - -o /dev/null "http://127.0.0.1:$ORIGIN_PORT/v2/$REPO/blobs/uploads/" |
  tr -d '\r' | awk 'tolower($1)=="location:" {print $2}')
case $location in http*) ;; *) location="http://127.0.0.1:$ORIGIN_PORT$location" ;; esac
case $location in *\?*) location="$location&digest=sha256:$HEX" ;; *) location="$location?digest=sha256:$HEX" ;; esac
code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT -H 'Content-Type: application/octet-stream' -T "$work/blob" "$location")
[ "$code" = 201 ] || die "blob upload answered $code"
rm -f "$work/blob"

cap_connections() { # cap_connections MBPS: every connection to the origin paced to MBPS MB/s
  stop capped
  "$CAPPED_PROXY" "$ORIGIN" "127.0.0.1:$ORIGIN_PORT" "$1" >>"$work/capped.log" 2>&1 &
  pid_of[capped]=$!
  wait_http "http://$ORIGIN/v2/" "capped origin"
}

start_larder() { # start_larder [flags]: fresh process, empty disk
  stop larder
  rm -rf "$work/larder-disk"
  # shellcheck disable=SC2086  # LARDER_FLAGS is split into flags on purpose
  "$LARDER_BIN" proxy --listen "127.0.0.1:$LARDER_PORT" --metrics-listen "127.0.0.1:$LARDER_METRICS" \
    --disk-cache "$work/larder-disk" --disk-cache-max-bytes 8GiB \
    --insecure-registry "$ORIGIN" $LARDER_FLAGS "$@" >>"$work/larder.log" 2>&1 &
  pid_of[larder]=$!
  wait_http "http://127.0.0.1:$LARDER_METRICS/readyz" larder
}
larder_settled() { # the download committed (no fetch in flight), up to 60 s
  local i
  for i in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$LARDER_METRICS/metrics" |
      grep -q '^larder_proxy_in_flight_fetches 0$' && return 0
    sleep 0.1
  done
  die "larder still downloading after 60 s"
}
start_ptc() {
  stop ptc; rm -rf "$work/ptc-store"
  start_registry ptc "127.0.0.1:$PTC_PORT" "http://$ORIGIN"
}
ptc_settled() { # the pull-through cache stores the blob in the background; up to 120 s
  local f="$work/ptc-store/docker/registry/v2/blobs/sha256/${HEX:0:2}/$HEX/data" i
  for i in $(seq 1 1200); do
    [ -f "$f" ] && [ "$(stat -c %s "$f")" = "$BYTES" ] && { sleep 0.3; return 0; }
    sleep 0.1
  done
  log "pull-through cache did not store the blob within 120 s"
}

url_of() { # url_of CONFIG
  case $1 in
    direct) echo "http://$ORIGIN/v2/$REPO/blobs/sha256:$HEX" ;;
    ptc) echo "http://127.0.0.1:$PTC_PORT/v2/$REPO/blobs/sha256:$HEX" ;;
    *) echo "http://127.0.0.1:$LARDER_PORT/v2/127.0.0.1_$CAPPED_PORT/$REPO/blobs/sha256:$HEX" ;;
  esac
}
log_lines() { wc -l <"$work/origin.log"; }

# crowd CONFIG CAP RUN N: N concurrent GETs; client 1 into a file, hashed once the clock stopped
# (a sha256sum in the pipe would limit the measured rate to its own), the others to /dev/null.
crowd() {
  local config=$1 cap=$2 run=$3 n=$4 url i start end ok=0 sum before
  url=$(url_of "$config")
  before=$(log_lines)
  local cpids=()
  start=$(date +%s.%N)
  curl -sf -o "$work/out" "$url" &
  cpids+=($!)
  for i in $(seq 2 "$n"); do
    curl -s -o /dev/null -w '%{http_code} %{size_download}\n' "$url" >"$work/client-$i" &
    cpids+=($!)
  done
  for i in "${cpids[@]}"; do wait "$i" || true; done
  end=$(date +%s.%N)
  sum=$(sha256sum "$work/out" | cut -d' ' -f1)
  rm -f "$work/out"
  [ "$sum" = "$HEX" ] && ok=1
  for i in $(seq 2 "$n"); do
    [ "$(cat "$work/client-$i")" = "200 $BYTES" ] && ok=$((ok + 1))
  done
  record "$config" "$cap" "$run" "$n" "$start" "$end" "$ok" "$before" "$sum"
}

# parts CAP RUN: one client, the blob as 4 concurrent ranges (curl -r), reassembled and hashed.
parts() {
  local cap=$1 run=$2 url i start end ok=0 q=$((BYTES / 4)) from to sum before
  url=$(url_of larder)
  before=$(log_lines)
  local cpids=()
  start=$(date +%s.%N)
  for i in 0 1 2 3; do
    from=$((i * q)); to=$(( i == 3 ? BYTES - 1 : (i + 1) * q - 1 ))
    curl -sf -r "$from-$to" -o "$work/part-$i" "$url" &
    cpids+=($!)
  done
  for i in "${cpids[@]}"; do wait "$i" && ok=$((ok + 1)) || true; done
  end=$(date +%s.%N)
  sum=$(cat "$work"/part-{0,1,2,3} | sha256sum | cut -d' ' -f1)
  rm -f "$work"/part-*
  # One client: complete when all four parts came back and reassemble to the blob.
  if [ "$ok" = 4 ] && [ "$sum" = "$HEX" ]; then ok=1; else ok=0; fi
  record larder-parts "$cap" "$run" 1 "$start" "$end" "$ok" "$before" "$sum"
}

# record CONFIG CAP RUN CLIENTS START END OK LOGLINE_BEFORE SUM: one TSV line, with the origin's
# GETs of the blob since LOGLINE_BEFORE (206s counted apart) and the body bytes it logged.
record() {
  local reqs ranged bytes
  sleep 0.3  # distribution logs a request when it completes
  # ... "GET /v2/REPO/blobs/sha256:HEX HTTP/1.1" STATUS BYTES "referer" "agent"
  read -r reqs ranged bytes < <(tail -n +"$(($8 + 1))" "$work/origin.log" |
    awk -F'"' -v h="$HEX" '$2 ~ /^GET / && index($2, h) {split($3, f, " "); n++; if (f[1] == 206) r++; b += f[2]} END {printf "%d %d %.0f\n", n, r, b}')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" \
    "$(python3 -c "print(round($6 - $5, 3))")" "$7" "$reqs" "$ranged" "$bytes" "$BYTES" \
    "$([ "$9" = "$HEX" ] && echo ok || echo "BAD $9")" >>"$results"
  log "$1 cap=$2 run=$3: $(python3 -c "print(round($6 - $5, 2))") s, $7/$4 complete, origin GETs $reqs ($ranged with 206), $bytes bytes"
}

for cap in $CAPS; do
  cap_connections "$cap"
  for run in $(seq 1 "$RUNS"); do
    log "cap $cap MB/s: round $run of $RUNS"
    for config in $CONFIGS; do
      case $config in
        direct) crowd direct "$cap" "$run" 1 ;;
        larder) start_larder; crowd larder "$cap" "$run" "$CLIENTS"; larder_settled ;;
        larder-one) start_larder; crowd larder-one "$cap" "$run" 1; larder_settled ;;
        larder-single)
          start_larder --upstream-ranged-connections 1
          crowd larder-single "$cap" "$run" "$CLIENTS"; larder_settled ;;
        # The pull-through cache's background store is an origin fetch of this run too.
        ptc) start_ptc; crowd ptc "$cap" "$run" "$CLIENTS"; ptc_settled ;;
        larder-parts) start_larder; parts "$cap" "$run"; larder_settled ;;
        *) die "unknown configuration $config" ;;
      esac
    done
  done
done
stop larder; stop ptc; stop capped

python3 - "$results" "$MIB" "$CLIENTS" "$COMMIT" "$LARDER_FLAGS" >"$work/report.md" <<'PY'
import statistics, sys
path, mib, clients, commit, flags = sys.argv[1:6]
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
names = {
    "direct": "direct GET (one stream through the cap)",
    "larder": f"larder cold, {clients} clients (ranged, default flags)",
    "larder-one": "larder cold, 1 client (ranged, default flags)",
    "larder-single": f"larder cold, {clients} clients, `--upstream-ranged-connections 1`",
    "ptc": f"distribution pull-through cache cold, {clients} clients",
    "larder-parts": "larder cold, 1 client fetching 4 parallel ranges",
}
print(f"Cold miss of a {mib} MiB blob from CNCF distribution behind capped-proxy, which paces "
      f"every connection to the cap; larder {commit}"
      f"{' with ' + flags if flags else ''}; medians; MB/s = blob bytes / wall time until every "
      f"client had all of it.\n")
print("| cap per connection | configuration | runs | wall s (median) | MB/s | × direct GET "
      "| origin GETs of the blob per run (206s) | origin bytes / blob | complete | sha256 |")
print("|---|---|---:|---:|---:|---:|---:|---:|---|---|")
for cap in sorted({r[1] for r in rows}, key=float):
    def med(config):
        xs = [float(r[4]) for r in rows if r[0] == config and r[1] == cap]
        return statistics.median(xs) if xs else None
    direct = med("direct")
    for config in names:
        rs = [r for r in rows if r[0] == config and r[1] == cap]
        if not rs:
            continue
        wall = med(config)
        total = int(rs[0][9])
        gets = sorted(int(r[6]) for r in rs)
        ranged = sorted(int(r[7]) for r in rs)
        span = lambda v: f"{v[0]}" if v[0] == v[-1] else f"{v[0]}–{v[-1]}"
        obytes = statistics.median(float(r[8]) for r in rs) / total
        complete = f"{sum(int(r[5]) for r in rs)}/{sum(int(r[3]) for r in rs)}"
        sums = "ok" if all(r[10] == "ok" for r in rs) else "MISMATCH"
        print(f"| {cap} MB/s | {names[config]} | {len(rs)} | {wall:.2f} | {total / wall / 1e6:,.0f} "
              f"| {direct / wall:.2f} | {span(gets)} ({span(ranged)}) | {obytes:.2f} | {complete} | {sums} |")
PY
cat "$work/report.md"
if [ -n "$report" ]; then cp "$work/report.md" "$report"; log "report written to $report"; fi
