#!/usr/bin/env bash
# Runs each fuzz target in turn for $SECONDS_PER_TARGET (default 600), logging to logs/<target>.log.
# Usage: ./run-all.sh [target...]   (from fuzz/; RUSTC_BOOTSTRAP=1 lets stable Rust build it)
set -u
cd "$(dirname "$0")"
mkdir -p logs
seconds="${SECONDS_PER_TARGET:-600}"
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(route reference range www_authenticate docker_config admission)
for t in "${targets[@]}"; do
  max_len=4096
  [ "$t" = admission ] && max_len=16384
  echo "== $t $(date -u +%FT%TZ)" >>logs/runs.txt
  RUSTC_BOOTSTRAP=1 nice -n 15 cargo fuzz run "$t" -- \
    -max_total_time="$seconds" -max_len="$max_len" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
    >"logs/$t.log" 2>&1
  echo "   $t exit $? $(date -u +%FT%TZ)" >>logs/runs.txt
done
