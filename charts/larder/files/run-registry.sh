#!/bin/sh
# Runs CNCF distribution and, every GC_INTERVAL seconds when GC_ENABLED=true, collects garbage
# in a read-only window: distribution's `garbage-collect` is only safe while nothing writes, so
# the registry restarts with storage.maintenance.readonly enabled (pulls keep being served,
# pushes are refused and retried later by the controller), collects, and restarts read-write.
# The restarts cost pulls a refused connection each; larder's proxies then use the origin.
set -u
BIN="${REGISTRY_BIN:-registry}"
CONFIG="${REGISTRY_CONFIG:-/etc/larder-registry/config.yml}"
CONFIG_RO="${REGISTRY_CONFIG_READONLY:-/etc/larder-registry/config-readonly.yml}"
INTERVAL="${GC_INTERVAL:-86400}"
pid=""

log() { echo "larder-registry: $*" >&2; }

start() {
  "$BIN" serve "$1" &
  pid=$!
}

stop() {
  if [ -n "$pid" ]; then
    kill -TERM "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    pid=""
  fi
}

trap 'stop; exit 0' TERM INT

start "$CONFIG"
if [ "${GC_ENABLED:-false}" != "true" ]; then
  wait "$pid"
  exit $?
fi

while :; do
  waited=0
  while [ "$waited" -lt "$INTERVAL" ]; do
    # Sleep in the background so that TERM is handled at once.
    sleep 5 &
    wait $!
    waited=$((waited + 5))
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid"
      status=$?
      log "registry exited with status $status"
      exit "$status"
    fi
  done
  log "garbage collection: restarting read-only"
  stop
  start "$CONFIG_RO"
  # shellcheck disable=SC2086 # GC_FLAGS holds several flags
  if "$BIN" garbage-collect ${GC_FLAGS:-} "$CONFIG_RO"; then
    log "garbage collection: done"
  else
    log "garbage collection: failed (status $?), will retry at the next interval"
  fi
  log "garbage collection: restarting read-write"
  stop
  start "$CONFIG"
done
