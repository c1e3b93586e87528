#!/usr/bin/env bash
# Benchmark: `larder controller` at scale. 10,000 managed pods over 100 namespaces using 1,000
# distinct images (plus 50 that only churned-in pods use), in larder's fake API server (a test
# double: no validation, admission or RBAC) with real distribution registries as origin and
# cache. Reports time until every CachedImage is Ready with the right usedBy.count, the
# controller's peak RSS and CPU seconds, API requests and writes per object, then the same after
# deleting 10% of the pods and adding as many new ones.
# Usage: bash bench/controller.sh [--pods N --images N --namespaces N --churn-percent P
#                                  --controller-arg=--max-concurrent-copies=8 ...]
# Needs docker-registry (bash scripts/install-test-deps.sh). Prints the JSON result; progress on
# stderr. Bounded: each phase has a 15-minute deadline and the driver stops every process it
# started (by PID) when it ends or fails.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building larder and the benchmark driver (release)" >&2
cargo build --release --locked -q --bin larder
cargo build --release --locked -q -p larder-testkit --bin controller-bench
exec timeout 45m target/release/controller-bench --larder target/release/larder "$@"
