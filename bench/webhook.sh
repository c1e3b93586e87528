#!/usr/bin/env bash
# Benchmark: AdmissionReviews per second and latency percentiles of `larder webhook` over TLS,
# for a realistic pod (4 containers incl. an init container, env, volumes, ~6 KiB review).
# Closed-loop load with wrk at several connection counts; reports req/s and p50/p90/p99.
# Usage: bash bench/webhook.sh [REPORT.md]     (needs: wrk, openssl; builds larder --release)
set -euo pipefail
cd "$(dirname "$0")/.."
report=${1:-}
DURATION=${DURATION:-10s}

command -v wrk >/dev/null || { echo "wrk missing: bash scripts/install-test-deps.sh" >&2; exit 1; }
cargo build --release -q --bin larder
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# A serving certificate for 127.0.0.1, signed by a throwaway CA.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
  -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' > "$work/san.ext"
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
  -days 2 -extfile "$work/san.ext" -out "$work/tls.crt" 2>/dev/null

port=$(free_port); mport=$(free_port)
LARDER_LOG=warn target/release/larder webhook --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$mport" \
  --tls-cert "$work/tls.crt" --tls-key "$work/tls.key" >"$work/webhook.log" 2>&1 &
pids+=($!)
webhook_pid=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$mport/readyz" >/dev/null && break; sleep 0.1; done

python3 - "$work/review.json" <<'PY'
import json, sys, uuid
def container(name, image, extra_env=8):
    return {"name": name, "image": image, "imagePullPolicy": "IfNotPresent",
            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            "env": [{"name": f"VAR_{i}", "value": "x" * 40} for i in range(extra_env)],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
            "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "config", "mountPath": "/etc/app"}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 5}}
pod = {"apiVersion": "v1", "kind": "Pod",
       "metadata": {"name": "web-7d4b9c-abcde", "namespace": "shop", "generateName": "web-7d4b9c-",
                    "labels": {"app": "web", "pod-template-hash": "7d4b9c", "team": "checkout"},
                    "annotations": {"prometheus.io/scrape": "true", "kubectl.kubernetes.io/restartedAt": "2026-11-01T10:00:00Z"}},
       "spec": {"initContainers": [container("migrate", "ghcr.io/acme/migrate:2.3.1", 4)],
                "containers": [container("web", "nginx:1.27"),
                               container("app", "registry.example.com:5000/acme/app@sha256:" + "ab" * 32),
                               container("sidecar", "quay.io/prometheus/node-exporter:v1.8.2", 2)],
                "volumes": [{"name": "data", "emptyDir": {}}, {"name": "config", "configMap": {"name": "web"}}],
                "serviceAccountName": "web", "nodeSelector": {"kubernetes.io/os": "linux"}}}
review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
          "request": {"uid": str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": "Pod"},
                      "resource": {"group": "", "version": "v1", "resource": "pods"},
                      "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                      "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                      "name": "web-7d4b9c-abcde", "namespace": "shop", "operation": "CREATE",
                      "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                      "object": pod, "oldObject": None, "dryRun": False,
                      "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}}}
json.dump(review, open(sys.argv[1], "w"))
PY
# Sanity: the review is really rewritten (a patch comes back).
curl -sf --cacert "$work/ca.crt" -H 'Content-Type: application/json' --data-binary @"$work/review.json" \
  "https://127.0.0.1:$port/mutate-pods" | python3 -c 'import json,sys; r=json.load(sys.stdin)["response"]; assert r["allowed"] and r.get("patch"), r; print("sanity: patch returned")'

cat > "$work/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$work/review.json", "rb"); wrk.body = f:read("*a"); f:close()
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.0f %.3f %.3f %.3f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
LUA

{
  echo "## larder webhook: AdmissionReviews over TLS ($(date -u +%F), $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg))"
  echo
  echo "Review size: $(stat -c %s "$work/review.json") bytes; 4 images rewritten per review. wrk, ${DURATION} per row, up to 2 threads (one per connection when fewer)."
  echo
  echo "| connections | reviews/s | p50 ms | p90 ms | p99 ms | errors |"
  echo "|---|---|---|---|---|---|"
  for c in 1 2 4 16; do
    threads=$(( c < 2 ? c : 2 ))
    line=$(wrk -t"$threads" -c"$c" -d"$DURATION" -s "$work/post.lua" "https://127.0.0.1:$port/mutate-pods" | grep '^RESULT')
    read -r _ rps p50 p90 p99 errs <<<"$line"
    echo "| $c | $rps | $p50 | $p90 | $p99 | $errs |"
  done
  echo
  echo "Peak RSS of the webhook: $(grep VmHWM /proc/$webhook_pid/status | awk '{print $2/1024 " MiB"}')"
} | tee "${report:-/dev/null}"
