#!/usr/bin/env bash
# Cold misses when the origin is behind a real link, not on the same loopback as the client.
#
# On loopback a direct GET costs only the registry's and the client's CPU, while a cold miss
# through larder also costs a SHA-256 pass, a disk write and a re-read, on the same cores
# (bench/proxy.sh measures that case). A node's origin is a registry across a network: this
# benchmark puts the origin (CNCF distribution) in its own network namespace behind a veth pair
# whose origin side is shaped with a token bucket (tc tbf) to each RATE, and measures, per rate:
#   - a direct GET of the blob from the origin (curl),
#   - larder cold (empty disk, origin only),
#   - distribution's pull-through cache cold (empty storage, proxy.remoteurl = the origin),
# and prints a markdown table of medians with larder / direct ratios and larder's CPU per GiB.
#
# Usage: sudo bash bench/cold_link.sh [REPORT.md]
#   needs root (ip netns, tc), iproute2, docker-registry, curl, python3.
# Knobs: RATES="1gbit 5gbit none" (tc tbf rates; "none" = the veth unshaped), MIB=256, RUNS=3,
#   LARDER_BIN (skip the build), BENCH_TMP (scratch parent, default /tmp).
# Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
report=${1:-}
RATES=${RATES:-"1gbit 5gbit none"}
MIB=${MIB:-256}
RUNS=${RUNS:-3}

log() { printf '[cold-link %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root for ip netns and tc"
for tool in ip tc docker-registry curl python3 sha256sum; do
  command -v "$tool" >/dev/null || die "$tool missing"
done

if [ -z "${LARDER_BIN:-}" ]; then
  log "building larder (cargo build --release)"
  cargo build --release --locked -q --bin larder
  LARDER_BIN=$ROOT/target/release/larder
fi
COMMIT=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)

work=$(mktemp -d "${BENCH_TMP:-/tmp}/larder-cold-link.XXXXXX")
NS=larder-bench-$$
HOST_IF=lbh$$
NS_IF=lbo$$
# A /30 from TEST-NET-ish private space no real network here uses; the origin is reachable only
# through the veth, so nothing leaves the machine.
HOST_IP=10.201.$(($$ % 250)).1
ORIGIN_IP=10.201.$(($$ % 250)).2
ORIGIN_PORT=5000
declare -A pid_of=()

cleanup() {
  local name
  for name in "${!pid_of[@]}"; do
    kill "${pid_of[$name]}" 2>/dev/null || true
    wait "${pid_of[$name]}" 2>/dev/null || true
  done
  ip link del "$HOST_IF" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stop() {
  local pid=${pid_of[$1]:-}
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset "pid_of[$1]"
}

wait_http() {
  local i
  for i in $(seq 1 200); do curl -s -o /dev/null "$1" && return 0; sleep 0.05; done
  die "$2 did not come up ($1)"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

registry_config() { # registry_config FILE ADDR STORE [REMOTE]
  cat >"$1" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $3}
  delete: {enabled: true}
http: {addr: $2, secret: larder-bench}
EOF
  if [ -n "${4:-}" ]; then echo "proxy: {remoteurl: $4}" >>"$1"; fi
}

log "network namespace $NS: origin at $ORIGIN_IP behind $NS_IF"
ip netns add "$NS"
ip link add "$HOST_IF" type veth peer name "$NS_IF"
ip link set "$NS_IF" netns "$NS"
ip addr add "$HOST_IP/30" dev "$HOST_IF"
ip link set "$HOST_IF" up
ip netns exec "$NS" ip addr add "$ORIGIN_IP/30" dev "$NS_IF"
ip netns exec "$NS" ip link set "$NS_IF" up
ip netns exec "$NS" ip link set lo up

registry_config "$work/origin.yml" "$ORIGIN_IP:$ORIGIN_PORT" "$work/origin-store"
ip netns exec "$NS" docker-registry serve "$work/origin.yml" >"$work/origin.log" 2>&1 &
pid_of[origin]=$!
ORIGIN=http://$ORIGIN_IP:$ORIGIN_PORT
wait_http "$ORIGIN/v2/" "origin registry"

log "pushing a $MIB MiB blob of random bytes"
head -c "$((MIB << 20))" /dev/urandom >"$work/blob"
HEX=$(sha256sum "$work/blob" | cut -d' ' -f1)
BYTES=$((MIB << 20))
location=$(curl -sf -X POST -D - -o /dev/null "$ORIGIN/v2/bench/cold/blobs/uploads/" |
  tr -d '\r' | awk 'tolower($1)=="location:" {print $2}')
case $location in http*) ;; *) location="$ORIGIN$location" ;; esac
code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT -H 'Content-Type: application/octet-stream' \
  -T "$work/blob" "$location&digest=sha256:$HEX")
[ "$code" = 201 ] || die "blob upload answered $code"
rm -f "$work/blob"

shape() { # shape RATE: the origin's egress (the blob's direction) limited to RATE
  ip netns exec "$NS" tc qdisc del dev "$NS_IF" root 2>/dev/null || true
  if [ "$1" != none ]; then
    # burst: at least rate/HZ; 4 MiB covers 10 Gbit at HZ=250.
    ip netns exec "$NS" tc qdisc add dev "$NS_IF" root tbf rate "$1" burst 4mb latency 100ms
  fi
}

get() { # get URL: prints bytes/s, checks the size
  local out
  out=$(curl -s -o /dev/null -w '%{size_download} %{speed_download} %{http_code}' --max-time 600 "$1")
  set -- $out
  [ "$3" = 200 ] && [ "$1" = "$BYTES" ] || die "GET answered $3 with $1 bytes"
  echo "$2"
}

results=$work/results.jsonl
: >"$results"
record() { printf '{"rate":"%s","what":"%s","bps":%s,"cpu_ms":%s}\n' "$1" "$2" "$3" "${4:-null}" >>"$results"; }

cpu_ms() { awk '{print ($14 + $15) * 10}' "/proc/$1/stat"; } # clock ticks of 10 ms

for rate in $RATES; do
  shape "$rate"
  log "rate $rate"
  for run in $(seq 1 "$RUNS"); do
    record "$rate" direct "$(get "$ORIGIN/v2/bench/cold/blobs/sha256:$HEX")"
  done
  for run in $(seq 1 "$RUNS"); do
    port=$(free_port); metrics=$(free_port)
    rm -rf "$work/disk"; mkdir -p "$work/disk"
    "$LARDER_BIN" proxy --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics" \
      --disk-cache "$work/disk" --insecure-registry "$ORIGIN_IP:$ORIGIN_PORT" \
      >"$work/larder.log" 2>&1 &
    pid_of[larder]=$!
    wait_http "http://127.0.0.1:$port/v2/" larder
    before=$(cpu_ms "${pid_of[larder]}")
    bps=$(get "http://127.0.0.1:$port/v2/${ORIGIN_IP}_$ORIGIN_PORT/bench/cold/blobs/sha256:$HEX")
    after=$(cpu_ms "${pid_of[larder]}")
    record "$rate" larder "$bps" "$((after - before))"
    stop larder
  done
  for run in $(seq 1 "$RUNS"); do
    port=$(free_port)
    rm -rf "$work/ptc-store"
    registry_config "$work/ptc.yml" "127.0.0.1:$port" "$work/ptc-store" "$ORIGIN"
    docker-registry serve "$work/ptc.yml" >"$work/ptc.log" 2>&1 &
    pid_of[ptc]=$!
    wait_http "http://127.0.0.1:$port/v2/" "pull-through cache"
    record "$rate" pull-through "$(get "http://127.0.0.1:$port/v2/bench/cold/blobs/sha256:$HEX")"
    stop ptc
  done
done

python3 - "$results" "$MIB" "$RUNS" "$COMMIT" "$(nproc)" >"$work/report.md" <<'EOF'
import json, statistics, sys
path, mib, runs, commit, cores = sys.argv[1:]
rows = [json.loads(l) for l in open(path)]
rates = list(dict.fromkeys(r["rate"] for r in rows))
def med(rate, what, key="bps"):
    v = [r[key] for r in rows if r["rate"] == rate and r["what"] == what and r[key] is not None]
    return statistics.median(v) if v else None
print(f"Cold miss of a {mib} MiB blob, origin in a network namespace behind a veth shaped with "
      f"tc tbf; medians of {runs} runs; larder {commit}; {cores} cores.\n")
print("| origin link | direct GET MB/s | larder cold MB/s | larder / direct | pull-through cold MB/s "
      "| pull-through / direct | larder CPU s/GiB |")
print("|---|---:|---:|---:|---:|---:|---:|")
for rate in rates:
    d, l, p = (med(rate, w) for w in ("direct", "larder", "pull-through"))
    cpu = med(rate, "larder", "cpu_ms")
    cpu_per_gib = cpu / 1000 / (int(mib) / 1024) if cpu is not None else None
    print(f"| {rate} | {d/1e6:.0f} | {l/1e6:.0f} | {l/d:.2f}× | {p/1e6:.0f} | {p/d:.2f}× "
          f"| {cpu_per_gib:.2f} |")
EOF
cat "$work/report.md"
if [ -n "$report" ]; then cp "$work/report.md" "$report"; fi
