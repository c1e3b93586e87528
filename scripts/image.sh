#!/usr/bin/env bash
# Builds larder's image offline — no container engine, no base image — and pushes it.
#
#   scripts/image.sh DEST [--binary PATH] [--insecure] [--version V]
#     DEST      where to push, as skopeo names it without the transport, e.g.
#               registry.example:5000/larder:0.1.0 (docker://), or oci:DIR:TAG for a layout only
#     --binary  a release build of larder to use (default: cargo build --release --locked)
#     --insecure  push over plain http / without TLS verification (a registry on the node)
#     --version the image's org.opencontainers.image.version label (default: the crate version)
#
# The image holds what the Containerfile's (distroless cc-debian12:nonroot) does for larder:
# /usr/local/bin/larder, the shared libraries it links (from this machine, Debian 12's glibc),
# the CA bundle, passwd/group with nonroot 65532, /tmp, user 65532:65532, the same entrypoint
# and labels. Prints the pushed manifest digest on stdout, last.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
dest=""; binary=""; insecure=false
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
while (($#)); do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --insecure) insecure=true; shift ;;
    --version) version="$2"; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "image.sh: unknown flag $1" >&2; usage ;;
    *) [ -z "$dest" ] || usage; dest="$1"; shift ;;
  esac
done
[ -n "$dest" ] || usage
for tool in python3 skopeo ldd; do  # ldd: the binary's shared libraries go in too
  command -v "$tool" >/dev/null || { echo "image.sh: $tool is needed (Debian: python3, skopeo, libc-bin)" >&2; exit 1; }
done

if [ -z "$binary" ]; then
  cargo build --release --locked --bin larder >&2
  binary=target/release/larder
fi
[ -x "$binary" ] || { echo "image.sh: $binary is not an executable" >&2; exit 1; }
"$binary" --version >/dev/null || { echo "image.sh: $binary does not run here" >&2; exit 1; }
ca=/etc/ssl/certs/ca-certificates.crt
[ -s "$ca" ] || { echo "image.sh: no CA bundle at $ca (Debian: ca-certificates)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
layout="$work/layout"

# The release profile keeps line tables for local profiling; the image needs none of it.
if command -v strip >/dev/null; then
  strip --strip-debug -o "$work/larder" "$binary"
  binary="$work/larder"
fi

revision="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
python3 scripts/oci_image.py "$layout" larder \
  --binary "$binary:/usr/local/bin/larder:0755" \
  --file "$ca:/etc/ssl/certs/ca-certificates.crt:0644" \
  --text "/etc/passwd:0644:root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
" \
  --text "/etc/group:0644:root:x:0:
nonroot:x:65532:
" \
  --dir /tmp:1777 \
  --entrypoint '["/usr/local/bin/larder"]' \
  --user 65532:65532 \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --label org.opencontainers.image.title=larder \
  --label "org.opencontainers.image.description=Kubernetes image cache: admission webhook, node-local pull proxy, controllers" \
  --label org.opencontainers.image.source=https://github.com/larder-dev/larder \
  --label "org.opencontainers.image.version=$version" \
  --label "org.opencontainers.image.revision=$revision" \
  --label org.opencontainers.image.licenses=Apache-2.0 >/dev/null

case "$dest" in
  oci:*) target="$dest" ;;
  *) target="docker://$dest" ;;
esac
flags=()
$insecure && flags+=(--dest-tls-verify=false)
skopeo copy -q "${flags[@]}" --digestfile "$work/digest" "oci:$layout:larder" "$target" >&2
cat "$work/digest"; echo
