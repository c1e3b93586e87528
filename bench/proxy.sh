#!/usr/bin/env bash
# Benchmark of `larder proxy` against its peers, in one run, on loopback only:
#   - nginx (sendfile on) serving the very blob files the origin registry stores: the physical limit;
#   - a direct CNCF distribution registry (the origin);
#   - distribution's pull-through cache (proxy.remoteurl = the origin), cold and warm;
#   - larder: cold (empty disk, origin only), via the cache registry (empty disk), warm (disk).
# Measures blob throughput and time to first byte (200 MiB and 1 GiB of random bytes), manifest
# requests/s and latency by tag and by digest (wrk, 16 connections), and larder's peak RSS under
# 16 concurrent pulls of the 1 GiB blob (cold and warm). Prints a markdown report.
#
# Usage: bash bench/proxy.sh [REPORT.md]
#   needs: docker-registry, nginx (nginx-light), wrk, curl, python3 (bash scripts/install-test-deps.sh)
# Knobs (environment): RUNS=5 (timed runs per blob configuration), WRK_DURATION=10s,
#   SMALL_MIB=200, BIG_MIB=1024, CLIENTS=16, IDLE_WAIT=600 (seconds to wait for other cargo/rustc
#   jobs to end before measuring; SETTLE_WAIT=60 the same before each configuration),
#   LARDER_BIN (skip the build and use this binary; LARDER_COMMIT names its source in the report),
#   LARDER_FLAGS (extra flags for every larder started, e.g. "--upstream-ranged-connections 1"),
#   BENCH_TMP (parent of the scratch directory; default $TMPDIR or /tmp).
# Not part of CI: scripts/test.sh does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
report=${1:-}
RUNS=${RUNS:-5}
WRK_DURATION=${WRK_DURATION:-10s}
SMALL_MIB=${SMALL_MIB:-200}
BIG_MIB=${BIG_MIB:-1024}
CLIENTS=${CLIENTS:-16}
IDLE_WAIT=${IDLE_WAIT:-600}
SETTLE_WAIT=${SETTLE_WAIT:-60}
ACCEPT='application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json'
REPO=bench/app
TAG=v1

BENCH_NAME=bench
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

for tool in docker-registry nginx wrk curl python3 sha256sum; do
  command -v "$tool" >/dev/null || die "$tool missing: run bash scripts/install-test-deps.sh"
done

# ---------------------------------------------------------------- build
if [ -z "${LARDER_BIN:-}" ]; then
  log "building larder (cargo build --release)"
  cargo build --release --locked -q --bin larder
  LARDER_BIN=$ROOT/target/release/larder
  LARDER_COMMIT=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
fi
[ -x "$LARDER_BIN" ] || die "no larder binary at $LARDER_BIN"

# ---------------------------------------------------------------- scratch space
parent=${BENCH_TMP:-${TMPDIR:-/tmp}}
need_mib=$(( (SMALL_MIB + BIG_MIB) * 6 + 512 ))
avail_mib=$(df -Pm "$parent" | awk 'NR==2 {print $4}')
log "free space in $parent: ${avail_mib} MiB (need about ${need_mib} MiB)"
df -h "$parent" >&2
((avail_mib > need_mib)) || die "not enough space in $parent"
work=$(mktemp -d "$parent/larder-bench.XXXXXX")
results=$work/results.jsonl
: >"$results"

trap cleanup EXIT
trap 'exit 130' INT TERM

emit() { printf '%s\n' "$1" >>"$results"; }
meta() { emit "$(python3 -c 'import json,sys; print(json.dumps({"t":"meta","key":sys.argv[1],"value":sys.argv[2]}))' "$1" "$2")"; }

busy_builds() { pgrep -x cargo >/dev/null 2>&1 || pgrep -x rustc >/dev/null 2>&1; }
# wait_idle SECONDS SECTION: wait (bounded) until no cargo/rustc runs, then record the load.
wait_idle() {
  local budget=$1 section=$2 waited=0
  while busy_builds && ((waited < budget)); do
    ((waited % 30 == 0)) && log "cargo/rustc running (another engineer compiling); waiting (${waited}s of ${budget}s)"
    sleep 5; waited=$((waited + 5))
  done
  local state=idle
  busy_builds && state="cargo/rustc running"
  emit "$(printf '{"t":"load","section":"%s","loadavg":"%s","builds":"%s","waited":%d}' \
    "$section" "$(cut -d' ' -f1-3 /proc/loadavg)" "$state" "$waited")"
}
settle() { # a shorter, silent wait_idle before each configuration
  local waited=0
  while busy_builds && ((waited < SETTLE_WAIT)); do sleep 2; waited=$((waited + 2)); done
}
busy_flag() { if busy_builds; then echo 1; else echo 0; fi; }

# ---------------------------------------------------------------- machine
meta date "$(date -u +%Y-%m-%dT%H:%MZ)"
meta commit "${LARDER_COMMIT:-unknown (LARDER_BIN=$LARDER_BIN)}${LARDER_FLAGS:+ with $LARDER_FLAGS}"
meta cores "$(nproc)"
meta cpu "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
meta memory "$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
meta kernel "$(uname -r)"
meta uptime_start "$(uptime)"
meta versions "$(docker-registry --version 2>&1 | awk '{print $NF}') (distribution), $(nginx -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}'), curl $(curl --version | awk 'NR==1 {print $2}'), larder $("$LARDER_BIN" --version | awk '{print $NF}')"
meta runs "$RUNS"
meta wrk "wrk -t2 -c$CLIENTS -d$WRK_DURATION --latency"
meta clients "$CLIENTS"
# One core's SHA-256 speed: a verified cold miss cannot finish faster than the blob can be hashed.
if command -v openssl >/dev/null; then
  meta sha256 "$(openssl speed -seconds 2 -bytes 262144 -evp sha256 2>/dev/null |
    awk '$1 == "sha256" {v=$2; sub(/k$/, "", v); printf "%.0f", v * 1000 / 1e6}')"
fi

# ---------------------------------------------------------------- registries
ORIGIN_PORT=$(free_port); CACHE_PORT=$(free_port); PTC_PORT=$(free_port)
NGINX_PORT=$(free_port); LARDER_PORT=$(free_port); LARDER_METRICS=$(free_port)
HOSTREPO="127.0.0.1_${ORIGIN_PORT}/${REPO}"


push_blob() { # push_blob PORT REPO FILE DIGEST: monolithic upload
  local port=$1 repo=$2 file=$3 digest=$4 location
  location=$(curl -sf -X POST -D - -o /dev/null "http://127.0.0.1:$port/v2/$repo/blobs/uploads/" |
    tr -d '\r' | awk 'tolower($1)=="location:" {print $2}')
  [ -n "$location" ] || die "no upload location from 127.0.0.1:$port"
  case $location in http*) ;; *) location="http://127.0.0.1:$port$location" ;; esac
  case $location in *\?*) location="$location&digest=$digest" ;; *) location="$location?digest=$digest" ;; esac
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT -H 'Content-Type: application/octet-stream' \
    -T "$file" "$location")
  [ "$code" = 201 ] || die "blob upload to 127.0.0.1:$port/$repo answered $code"
}

push_manifest() { # push_manifest PORT REPO FILE TAG
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT \
    -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary "@$3" "http://127.0.0.1:$1/v2/$2/manifests/$4")
  [ "$code" = 201 ] || die "manifest upload to 127.0.0.1:$1/$2 answered $code"
}

log "making ${SMALL_MIB} MiB and ${BIG_MIB} MiB of random bytes"
mkdir -p "$work/data"
head -c "$((SMALL_MIB << 20))" /dev/urandom >"$work/data/small"
head -c "$((BIG_MIB << 20))" /dev/urandom >"$work/data/big"
SMALL_HEX=$(sha256sum "$work/data/small" | cut -d' ' -f1)
BIG_HEX=$(sha256sum "$work/data/big" | cut -d' ' -f1)
SMALL_BYTES=$((SMALL_MIB << 20)); BIG_BYTES=$((BIG_MIB << 20))
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$SMALL_HEX" >"$work/data/config"
CONFIG_HEX=$(sha256sum "$work/data/config" | cut -d' ' -f1)
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%d}]}' \
  "$CONFIG_HEX" "$(stat -c %s "$work/data/config")" "$SMALL_HEX" "$SMALL_BYTES" >"$work/data/manifest"
MANIFEST_DIGEST=sha256:$(sha256sum "$work/data/manifest" | cut -d' ' -f1)

log "starting the origin and the cache registry; pushing"
start_registry origin "127.0.0.1:$ORIGIN_PORT"
start_registry cache "127.0.0.1:$CACHE_PORT"
for target in "$ORIGIN_PORT $REPO" "$CACHE_PORT $HOSTREPO"; do
  set -- $target
  push_blob "$1" "$2" "$work/data/config" "sha256:$CONFIG_HEX"
  push_blob "$1" "$2" "$work/data/small" "sha256:$SMALL_HEX"
  push_blob "$1" "$2" "$work/data/big" "sha256:$BIG_HEX"
  push_manifest "$1" "$2" "$work/data/manifest" "$TAG"
done

# nginx serves the origin's own stored files (hard links, no copy), with sendfile.
mkdir -p "$work/www" "$work/nginx"
stored() { echo "$work/origin-store/docker/registry/v2/blobs/sha256/${1:0:2}/$1/data"; }
ln "$(stored "$SMALL_HEX")" "$work/www/$SMALL_HEX"
ln "$(stored "$BIG_HEX")" "$work/www/$BIG_HEX"
rm -f "$work/data/small" "$work/data/big"
user_line=""; [ "$(id -u)" -eq 0 ] && user_line="user root;"
cat >"$work/nginx/nginx.conf" <<EOF
daemon off;
$user_line
worker_processes auto;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  default_type application/octet-stream;
  server { listen 127.0.0.1:$NGINX_PORT; root $work/www; }
}
EOF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" >"$work/nginx/stdout.log" 2>&1 &
pid_of[nginx]=$!
wait_http "http://127.0.0.1:$NGINX_PORT/$SMALL_HEX" nginx

# ---------------------------------------------------------------- larder and the pull-through cache
LARDER_DISK=$work/larder-disk
# start_larder [extra flags]: fresh process on the same disk directory
start_larder() {
  # shellcheck disable=SC2086  # LARDER_FLAGS is split into flags on purpose
  "$LARDER_BIN" proxy --listen "127.0.0.1:$LARDER_PORT" --metrics-listen "127.0.0.1:$LARDER_METRICS" \
    --disk-cache "$LARDER_DISK" --disk-cache-max-bytes 8GiB \
    --insecure-registry "127.0.0.1:$ORIGIN_PORT" ${LARDER_FLAGS:-} "$@" >>"$work/larder.log" 2>&1 &
  pid_of[larder]=$!
  wait_http "http://127.0.0.1:$LARDER_METRICS/readyz" larder
}
restart_larder_cold() { # empty disk; flags as start_larder
  stop larder; rm -rf "$LARDER_DISK"; start_larder "$@"
}
larder_metric() { # larder_metric NAME [RE1 [RE2]]: sum of the samples whose labels match both
  curl -sf "http://127.0.0.1:$LARDER_METRICS/metrics" |
    awk -v m="$1" -v a="${2:-.}" -v b="${3:-.}" \
      '$1 ~ "^"m"({|$)" && $1 ~ a && $1 ~ b {s += $2} END {printf "%d\n", s}'
}
larder_sources() { # which tiers served blobs, e.g. "origin=1 disk=0"
  local src out=""
  for src in disk cache origin; do
    out+="$src=$(larder_metric larder_proxy_requests_total "kind=\"blob\"" "source=\"$src\"") "
  done
  echo "${out% }"
}
wait_larder_settled() { # no download in flight (the last one committed to disk); up to 60 s
  local i
  for i in $(seq 1 600); do
    [ "$(larder_metric larder_proxy_in_flight_fetches)" = 0 ] && return 0
    sleep 0.1
  done
  die "larder still has a download in flight after 60 s"
}
restart_ptc_cold() {
  stop ptc; rm -rf "$work/ptc-store"; start_registry ptc "127.0.0.1:$PTC_PORT" "http://127.0.0.1:$ORIGIN_PORT"
}
wait_ptc_stored() { # the pull-through cache keeps blobs in a background copy; up to 60 s
  local f="$work/ptc-store/docker/registry/v2/blobs/sha256/${1:0:2}/$1/data" i
  for i in $(seq 1 600); do
    [ -f "$f" ] && [ "$(stat -c %s "$f")" = "$2" ] && { sleep 0.2; return 0; }
    sleep 0.1
  done
  die "pull-through cache did not store $1 within 60 s"
}

origin_count() { grep -c "\"$1 /v2/$REPO/$2" "$work/origin.log" || true; }

# ---------------------------------------------------------------- blob measurements
url_for() { # url_for CONFIG HEX
  case $1 in
    nginx) echo "http://127.0.0.1:$NGINX_PORT/$2" ;;
    registry) echo "http://127.0.0.1:$ORIGIN_PORT/v2/$REPO/blobs/sha256:$2" ;;
    ptc-*) echo "http://127.0.0.1:$PTC_PORT/v2/$REPO/blobs/sha256:$2" ;;
    larder-*) echo "http://127.0.0.1:$LARDER_PORT/v2/$HOSTREPO/blobs/sha256:$2" ;;
  esac
}
prepare() { # prepare CONFIG: the state a cold measurement starts from
  case $1 in
    ptc-cold) restart_ptc_cold ;;
    larder-cold) restart_larder_cold ;;
    larder-cache) restart_larder_cold --cache-registry "http://127.0.0.1:$CACHE_PORT" ;;
  esac
}
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
server_pid() { # the process that answers CONFIG (nginx: none, its workers are children)
  case $1 in registry) echo "${pid_of[origin]}" ;; ptc-*) echo "${pid_of[ptc]}" ;; larder-*) echo "${pid_of[larder]}" ;; *) echo "" ;; esac
}
# timed CONFIG LABEL HEX BYTES RUN: one GET to /dev/null; the serving process's CPU time around it
timed() {
  local url out pid c0=0 cpu=-1
  url=$(url_for "$1" "$3")
  pid=$(server_pid "$1")
  sync
  [ -n "$pid" ] && c0=$(cpu_ticks "$pid")
  out=$(curl -s -o /dev/null -w '%{http_code} %{time_total} %{time_starttransfer} %{size_download}' "$url")
  [ -n "$pid" ] && cpu=$(( $(cpu_ticks "$pid") - c0 ))
  set -- "$@" $out
  [ "$6" = 200 ] && [ "$9" = "$4" ] || die "$1 $2 run $5: HTTP $6, $9 of $4 bytes"
  emit "$(printf '{"t":"get","config":"%s","size":"%s","bytes":%s,"run":%s,"total":%s,"ttfb":%s,"busy":%d,"cpu_ticks":%d,"clk_tck":%d}' \
    "$1" "$2" "$9" "$5" "$7" "$8" "$(busy_flag)" "$cpu" "$CLK_TCK")"
}
# verify CONFIG LABEL HEX: one untimed GET through sha256sum
verify() {
  local got
  got=$(curl -sf "$(url_for "$1" "$3")" | sha256sum | cut -d' ' -f1)
  local ok=false; [ "$got" = "$3" ] && ok=true
  emit "$(printf '{"t":"verify","config":"%s","size":"%s","ok":%s}' "$1" "$2" "$ok")"
  $ok || die "$1 $2: downloaded bytes hash to $got, not $3"
}
sources() { # record which larder tier served the last request(s)
  emit "$(printf '{"t":"source","config":"%s","size":"%s","sources":"%s"}' "$1" "$2" "$(larder_sources)")"
}

wait_idle "$IDLE_WAIT" blobs
start_larder
restart_ptc_cold
# Configurations are measured in rounds (one run of each per round, in turn) so that a change in
# the machine's load (other engineers compiling) hits every configuration alike, and the ratios
# compare runs made side by side. nginx and the direct registry run in both kinds of rounds.
for size in small big; do
  if [ $size = small ]; then hex=$SMALL_HEX; bytes=$SMALL_BYTES; label="${SMALL_MIB} MiB"
  else hex=$BIG_HEX; bytes=$BIG_BYTES; label="$((BIG_MIB / 1024)) GiB"; [ $((BIG_MIB % 1024)) = 0 ] || label="${BIG_MIB} MiB"; fi
  log "$label: checking every configuration's bytes once (sha256, untimed)"
  verify nginx "$label" "$hex"
  verify registry "$label" "$hex"
  for config in ptc-cold larder-cold larder-cache; do prepare $config; verify $config "$label" "$hex"; done
  # Cold rounds: each cold run starts from a fresh state (prepare).
  for run in $(seq 1 "$RUNS"); do
    settle; log "$label: cold round $run of $RUNS (nginx, registry, ptc-cold, larder-cold, larder-cache)"
    for config in nginx registry ptc-cold larder-cold larder-cache; do
      prepare $config
      gets_before=$(origin_count GET "blobs/sha256:$hex")
      timed $config "$label" "$hex" "$bytes" "$run"
      # Let background work end before the next configuration runs: the pull-through cache
      # fetches the blob from the origin a second time to store it; larder commits (fsync).
      case $config in
        ptc-cold) wait_ptc_stored "$hex" "$bytes" ;;
        larder-*) sources $config "$label"; wait_larder_settled ;;
      esac
      sleep 0.2  # the access log line is written when a request completes
      emit "$(printf '{"t":"origin_gets","config":"%s","size":"%s","gets":%d}' "$config" "$label" \
        "$(($(origin_count GET "blobs/sha256:$hex") - gets_before))")"
    done
  done
  # Warm: the pull-through cache keeps what its last cold run fetched; larder restarts on the disk
  # its last cold run filled, so only the disk tier serves.
  wait_ptc_stored "$hex" "$bytes"
  wait_larder_settled
  stop larder; start_larder
  verify ptc-warm "$label" "$hex"
  verify larder-warm "$label" "$hex"
  for run in $(seq 1 "$RUNS"); do
    settle; log "$label: warm round $run of $RUNS (nginx, registry, ptc-warm, larder-warm)"
    for config in nginx registry ptc-warm larder-warm; do
      timed $config "$label" "$hex" "$bytes" "$((RUNS + run))"
    done
  done
  sources larder-warm "$label"
done

# ---------------------------------------------------------------- manifests
# run_wrk TARGET REF URL [EXTRA]: wrk output kept for the report; origin HEAD/GET counts around it
run_wrk() {
  local target=$1 ref=$2 url=$3 extra=${4:-} file="$work/wrk-$1-$2.txt" body
  body=$(curl -sf -H "Accept: $ACCEPT" "$url" | sha256sum | cut -d' ' -f1)
  [ "sha256:$body" = "$MANIFEST_DIGEST" ] || die "$target $ref: manifest hashes to $body"
  local heads_before gets_before
  heads_before=$(origin_count HEAD manifests); gets_before=$(origin_count GET manifests)
  settle; log "wrk $target by $ref"
  local busy; busy=$(busy_flag)
  wrk -t2 -c"$CLIENTS" -d"$WRK_DURATION" --latency -H "Accept: $ACCEPT" "$url" >"$file" 2>&1
  sleep 0.3  # the access log line is written when a request completes
  [ "$busy" = 1 ] || busy=$(busy_flag)
  emit "$(printf '{"t":"wrk","target":"%s","ref":"%s","file":"%s","origin_heads":%d,"origin_gets":%d,"extra":"%s","busy":%d}' \
    "$target" "$ref" "$file" "$(($(origin_count HEAD manifests) - heads_before))" \
    "$(($(origin_count GET manifests) - gets_before))" "$extra" "$busy")"
}
wait_idle 120 manifests
reg_url=http://127.0.0.1:$ORIGIN_PORT/v2/$REPO/manifests
ptc_url=http://127.0.0.1:$PTC_PORT/v2/$REPO/manifests
larder_url=http://127.0.0.1:$LARDER_PORT/v2/$HOSTREPO/manifests
run_wrk registry tag "$reg_url/$TAG"
run_wrk registry digest "$reg_url/$MANIFEST_DIGEST"
run_wrk ptc tag "$ptc_url/$TAG"
run_wrk ptc digest "$ptc_url/$MANIFEST_DIGEST"
stop larder; start_larder   # default --tag-freshness (10s); run_wrk's first GET puts the manifest on disk
run_wrk larder tag "$larder_url/$TAG" "default --tag-freshness (10s)"
run_wrk larder digest "$larder_url/$MANIFEST_DIGEST"
stop larder; start_larder --tag-freshness 0s
run_wrk larder-fresh0 tag "$larder_url/$TAG" "--tag-freshness 0s: a HEAD to the origin per request"
stop larder

# ---------------------------------------------------------------- peak RSS under concurrent pulls
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
# crowd PHASE: CLIENTS concurrent GETs of the big blob; larder's VmHWM before and after
crowd() {
  local phase=$1 pid=${pid_of[larder]} base start end i ok=0 gets_before
  base=$(hwm_kib "$pid")
  gets_before=$(origin_count GET "blobs/sha256:$BIG_HEX")
  settle; sync
  local busy; busy=$(busy_flag)
  start=$(date +%s.%N)
  local cpids=()
  for i in $(seq 1 "$CLIENTS"); do
    curl -s -o /dev/null -w '%{http_code} %{size_download}\n' "$(url_for larder-x "$BIG_HEX")" \
      >"$work/crowd-$phase-$i.txt" &
    cpids+=($!)
  done
  for i in "${cpids[@]}"; do wait "$i" || true; done
  end=$(date +%s.%N)
  [ "$busy" = 1 ] || busy=$(busy_flag)
  for i in $(seq 1 "$CLIENTS"); do
    [ "$(cat "$work/crowd-$phase-$i.txt")" = "200 $BIG_BYTES" ] && ok=$((ok + 1))
  done
  sleep 0.3
  emit "$(printf '{"t":"rss","phase":"%s","base_kib":%d,"hwm_kib":%d,"wall":%s,"ok":%d,"clients":%d,"bytes":%d,"origin_gets":%d,"coalesced":%d,"sources":"%s","busy":%d}' \
    "$phase" "$base" "$(hwm_kib "$pid")" "$(python3 -c "print(round($end - $start, 3))")" "$ok" "$CLIENTS" \
    "$BIG_BYTES" "$(($(origin_count GET "blobs/sha256:$BIG_HEX") - gets_before))" \
    "$(larder_metric larder_proxy_coalesced_total)" "$(larder_sources)" "$busy")"
}
wait_idle 120 rss
log "peak RSS: $CLIENTS concurrent cold GETs of the big blob"
restart_larder_cold
crowd cold
wait_larder_settled
log "peak RSS: $CLIENTS concurrent warm GETs of the big blob"
stop larder; start_larder
crowd warm
stop larder

meta uptime_end "$(uptime)"
# Everything is measured: stop the servers before rendering.
for name in "${!pid_of[@]}"; do stop "$name"; done

python3 "$ROOT/bench/proxy_report.py" "$results" >"$work/report.md"
cat "$work/report.md"
if [ -n "$report" ]; then cp "$work/report.md" "$report"; log "report written to $report"; fi
