#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, then formatting, lints and
# every test (unit, and integration against real registries, skopeo, containerd, Prometheus).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-test-deps.sh
export PATH="$PWD/.tools:$PATH"

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked --no-fail-fast

# The end-to-end suite needs a Kubernetes API; none can be installed here, so CI runs it against
# larder's fake API server (tests/src/fake_apiserver: a test double with no validation, admission
# or RBAC). Given a real cluster's KUBECONFIG, `cargo test -p larder-controllers --test e2e` runs
# the same suite there.
echo "== e2e suite against the fake API server"
cargo build -p larder-testkit --bin fake-apiserver --locked -q
fake_dir="$(mktemp -d)"
./target/debug/fake-apiserver --kubeconfig "$fake_dir/kubeconfig" --max-lifetime 20m \
  >"$fake_dir/fake-apiserver.log" 2>&1 &
fake_pid=$!
stop_fake() {
  kill "$fake_pid" 2>/dev/null || true
  wait "$fake_pid" 2>/dev/null || true
  rm -rf "$fake_dir"
}
trap stop_fake EXIT
for _ in $(seq 100); do
  [ -s "$fake_dir/kubeconfig" ] && break
  sleep 0.1
done
if [ ! -s "$fake_dir/kubeconfig" ]; then
  echo "the fake API server did not start:"
  cat "$fake_dir/fake-apiserver.log"
  exit 1
fi
KUBECONFIG="$fake_dir/kubeconfig" cargo test -p larder-controllers --test e2e --locked -- --nocapture
echo "e2e suite ran against the fake API server ($(head -1 "$fake_dir/fake-apiserver.log"))"
stop_fake
trap - EXIT

# larder on a real cluster (tests/e2e/cluster.sh): runs when KUBECONFIG and
# LARDER_E2E_IMAGE_REGISTRY name one (docs/e2e-cluster.md); here it says it skips.
echo "== cluster e2e suite"
env -u KUBECONFIG bash tests/e2e/cluster.sh
