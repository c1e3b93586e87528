# What the benchmark scripts share (sourced, not run): logging, the processes a run started and
# their clean-up, waiting for a server, a free loopback port. The sourcing script sets
# BENCH_NAME (the log prefix) first, and `work` (its scratch directory, removed by `cleanup`)
# before it installs `trap cleanup EXIT`.

log() { printf '[%s %s] %s\n' "$BENCH_NAME" "$(date +%T)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

declare -A pid_of=() # NAME -> PID of every process the run started and has not stopped

cleanup() { # every process still running, by its PID, then the scratch directory
  local name
  for name in "${!pid_of[@]}"; do
    kill "${pid_of[$name]}" 2>/dev/null || true
    wait "${pid_of[$name]}" 2>/dev/null || true
  done
  rm -rf "$work"
}

stop() { # stop NAME: the process started under NAME, by its PID
  local name=$1 pid=${pid_of[$1]:-}
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  local i
  for i in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
  unset "pid_of[$name]"
}

wait_http() { # wait_http URL WHAT: up to 10 s
  local i
  for i in $(seq 1 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.05; done
  die "$2 did not come up ($1)"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_registry NAME ADDR [REMOTE]: CNCF distribution on ADDR (host:port), storage
# $work/NAME-store, log $work/NAME.log with the access log on (one line per request); REMOTE
# makes it a pull-through cache of that URL.
start_registry() {
  local name=$1 addr=$2 remote=${3:-}
  cat >"$work/$name.yml" <<YML
version: 0.1
log: {level: warn, accesslog: {disabled: false}}
storage:
  filesystem: {rootdirectory: $work/$name-store}
  cache: {blobdescriptor: inmemory}
  delete: {enabled: true}
http: {addr: $addr, secret: larder-bench}
YML
  [ -n "$remote" ] && echo "proxy: {remoteurl: $remote}" >>"$work/$name.yml"
  docker-registry serve "$work/$name.yml" >>"$work/$name.log" 2>&1 &
  pid_of[$name]=$!
  wait_http "http://$addr/v2/" "registry $name"
}
