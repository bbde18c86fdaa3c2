# Shared by benches/*.sh (sourced, not run): argument parsing, the herald binary, a private
# Redis, herald instances on ephemeral ports, `herald bench` with the right flags, and cleanup
# of everything started, on any exit.
#
# Environment:
#   HERALD_BIN   the herald binary (default target/release/herald; smoke runs accept
#                target/debug/herald)
#   BENCH_BIN    the binary whose `herald bench` generates the load (default HERALD_BIN), so
#                that an older server can be measured with today's generator
#   REDIS_URL    use this Redis instead of starting a private redis-server
#   BENCH_OUT    keep each run's JSON and SVG chart in this directory
#   BENCH_ARGS   extra `herald bench` flags, appended last (they override the scenario's)
#   JWT_SECRET   secret shared by the instances and the generator (default: a random one)
# Any other herald setting in the environment (HERALD_OUTBOUND_QUEUE, HERALD_PERSIST, …)
# reaches the instances. HERALD_IP_CONNECT_RATE defaults to 0 (unlimited) here, since every
# generated client connects from 127.0.0.x.

set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
SCRIPT=$(basename "$0" .sh)

SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h | --help)
      sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
      exit 0
      ;;
    *)
      echo "$SCRIPT: unknown argument $arg (only --smoke)" >&2
      exit 2
      ;;
  esac
done

HERALD_BIN=${HERALD_BIN:-$ROOT/target/release/herald}
if [ ! -x "$HERALD_BIN" ]; then
  echo "$SCRIPT: $HERALD_BIN not found: cargo build --release -p herald-server, or set HERALD_BIN" >&2
  exit 2
fi
BENCH_BIN=${BENCH_BIN:-$HERALD_BIN}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/herald-bench.XXXXXX")
export JWT_SECRET=${JWT_SECRET:-bench-secret-$RANDOM-$RANDOM-$RANDOM}
STARTED=()      # every process we started, stopped on exit
SERVER_PIDS=()  # herald instances
URLS=()
REDIS_PID=""
BENCH_REDIS_URL=""

# stop PIDS...: SIGTERM, then SIGKILL whatever is left after 5 s.
stop() {
  local pid
  for pid in "$@"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "$@"; do
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

cleanup() {
  local status=$?
  local pid others=()
  # Generators and instances first, Redis last, so that instances shut down cleanly.
  for pid in "${STARTED[@]}"; do
    [ "$pid" = "$REDIS_PID" ] || others+=("$pid")
  done
  stop "${others[@]}"
  [ -z "$REDIS_PID" ] || stop "$REDIS_PID"
  if [ "$status" -ne 0 ] && [ "${BENCH_SHOW_LOGS:-1}" = 1 ]; then
    local log
    for log in "$WORK"/*.log; do
      [ -f "$log" ] || continue
      echo "--- last lines of $(basename "$log")" >&2
      tail -n 5 "$log" >&2
    done
  fi
  # A database made on DATABASE_URL's server goes with the run (a private server goes with
  # $WORK).
  if [ -n "${PG_SHARED_DB:-}" ]; then
    psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $PG_SHARED_DB" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# raise_nofile N: lets this shell and its children open N files (root may raise the hard
# limit; others get what the hard limit allows).
raise_nofile() {
  local want=$1
  # Smoke runs hold a few hundred connections.
  [ "$SMOKE" = 1 ] && [ "$want" -gt 4096 ] && want=4096
  if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$want" ]; then
    ulimit -n "$want" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  fi
  if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$want" ]; then
    echo "$SCRIPT: warning: open files limited to $(ulimit -n), wanted $want" >&2
  fi
}

port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# start_redis: uses $REDIS_URL, or starts a private redis-server on a free port.
start_redis() {
  if [ -n "${REDIS_URL:-}" ]; then
    BENCH_REDIS_URL=$REDIS_URL
    return
  fi
  command -v redis-server >/dev/null || {
    echo "$SCRIPT: redis-server not found (install it or set REDIS_URL)" >&2
    exit 2
  }
  local port
  for _ in $(seq 1 50); do
    port=$((20000 + RANDOM % 20000))
    port_free "$port" && break
  done
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --maxclients 10000 >"$WORK/redis.log" 2>&1 &
  REDIS_PID=$!
  STARTED+=("$REDIS_PID")
  for _ in $(seq 1 100); do
    if redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; then
      BENCH_REDIS_URL="redis://127.0.0.1:$port"
      return
    fi
    kill -0 "$REDIS_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "$SCRIPT: redis-server did not start" >&2
  exit 1
}

# await_log PID LOG SED: waits (up to 20 s, while PID lives) for a line of LOG that the sed
# expression SED prints from; prints the first such output. Fails if none came.
await_log() {
  local pid=$1 log=$2 expr=$3 found
  for _ in $(seq 1 200); do
    found=$(sed -n "$expr" "$log" | head -n 1)
    if [ -n "$found" ]; then
      echo "$found"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# need_js_packages MODULE: exits unless tests/js's packages (which hold MODULE) are installed.
need_js_packages() {
  if [ ! -d "$ROOT/tests/js/node_modules/$1" ]; then
    echo "$SCRIPT: tests/js has no node_modules: (cd tests/js && npm ci)" >&2
    exit 2
  fi
}

# start_herald NAME: starts an instance on an ephemeral port (on the fleet's Redis when
# start_redis ran) and appends its URL and pid.
start_herald() {
  local name=$1 log="$WORK/$1.log"
  local redis_env=()
  if [ -n "$BENCH_REDIS_URL" ]; then
    redis_env=(REDIS_URL="$BENCH_REDIS_URL" HERALD_REDIS_KEY="bench-$$" HERALD_HISTORY_TTL=10m)
  fi
  # HERALD_BIN is the scripts' own variable: herald would warn of an unknown setting.
  env -u HERALD_BIN "${redis_env[@]}" PORT=0 HERALD_HOST=127.0.0.1 INSTANCE_ID="$name" \
    HERALD_DATA_DIR="$WORK/$name" HERALD_SHUTDOWN_TIMEOUT=3s \
    HERALD_IP_CONNECT_RATE="${HERALD_IP_CONNECT_RATE:-0}" \
    RUST_LOG="${RUST_LOG:-warn,herald_server=info}" \
    "$HERALD_BIN" serve >/dev/null 2>"$log" &
  local pid=$!
  STARTED+=("$pid")
  local addr
  addr=$(await_log "$pid" "$log" 's/.*herald listening.*addr=\([0-9.:]*\).*/\1/p') || {
    echo "$SCRIPT: herald $name did not start" >&2
    exit 1
  }
  if [ -n "$BENCH_REDIS_URL" ]; then
    # Ready means connected to Redis.
    for _ in $(seq 1 100); do
      (exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}" && printf 'GET /ready HTTP/1.0\r\n\r\n' >&3 && head -n 1 <&3 | grep -q ' 200') 2>/dev/null && break
      sleep 0.1
    done
  fi
  SERVER_PIDS+=("$pid")
  URLS+=("http://$addr")
}

# start_node NAME: starts tests/js/bench-server.mjs (Node socket.io 4.8 on the Redis adapter,
# serving the events `herald bench` speaks) on an ephemeral port and the fleet's Redis, and
# appends its URL and pid. Needs tests/js's packages (npm ci in tests/js).
start_node() {
  local name=$1 log="$WORK/$1.log"
  need_js_packages socket.io
  REDIS_URL="$BENCH_REDIS_URL" PORT=0 BENCH_KEY="bench-node-$$" \
    node "$ROOT/tests/js/bench-server.mjs" >"$log" 2>&1 &
  local pid=$!
  STARTED+=("$pid")
  local port
  port=$(await_log "$pid" "$log" 's/.*node-bench listening port=\([0-9]*\).*/\1/p') || {
    echo "$SCRIPT: node server $name did not start" >&2
    exit 1
  }
  SERVER_PIDS+=("$pid")
  URLS+=("http://127.0.0.1:$port")
}

join_by() {
  local IFS=$1
  shift
  echo "$*"
}

# run_bench LABEL FLAGS...: runs `herald bench` against the started instances, printing one
# line per figure and check; its exit status is the checks'.
run_bench() {
  local label=$1
  shift
  local out=()
  if [ -n "${BENCH_OUT:-}" ]; then
    mkdir -p "$BENCH_OUT"
    out=(--json "$BENCH_OUT/$label.json" --chart "$BENCH_OUT/$label.svg")
  fi
  local aux=()
  [ -n "$REDIS_PID" ] && aux=(--aux-pid "$REDIS_PID")
  local extra=()
  # shellcheck disable=SC2206 # BENCH_ARGS is split on purpose.
  [ -n "${BENCH_ARGS:-}" ] && extra=(${BENCH_ARGS})
  "$BENCH_BIN" bench --label "$label" --report lines --quiet \
    --url "$(join_by , "${URLS[@]}")" --pid "$(join_by , "${SERVER_PIDS[@]}")" \
    "${aux[@]}" "${out[@]}" "$@" "${extra[@]}"
}

# run_sharded LABEL SHARDS FLAGS...: like run_bench, but the clients are split over SHARDS
# generator processes (one process may not open more files than `ulimit -n` allows), which
# wait for each other after connecting and before closing; their results are merged into one
# report, checked with the same FLAGS.
run_sharded() {
  local label=$1 shards=$2
  shift 2
  local out=() aux=() extra=() files=() pids=()
  if [ -n "${BENCH_OUT:-}" ]; then
    mkdir -p "$BENCH_OUT"
    out=(--json "$BENCH_OUT/$label.json" --chart "$BENCH_OUT/$label.svg")
  fi
  [ -n "$REDIS_PID" ] && aux=(--aux-pid "$REDIS_PID")
  # shellcheck disable=SC2206 # BENCH_ARGS is split on purpose.
  [ -n "${BENCH_ARGS:-}" ] && extra=(${BENCH_ARGS})
  local prefix="bench-$$-$RANDOM-" barrier="$WORK/barrier-$label" k
  for k in $(seq 0 $((shards - 1))); do
    files+=("$WORK/$label-$k.json")
    "$BENCH_BIN" bench --label "$label-$k" --report none --quiet \
      --url "$(join_by , "${URLS[@]}")" --pid "$(join_by , "${SERVER_PIDS[@]}")" "${aux[@]}" \
      --room-prefix "$prefix" --shard "$k/$shards" --barrier "$barrier" \
      --json "$WORK/$label-$k.json" "$@" "${extra[@]}" 2>"$WORK/$label-$k.bench.log" &
    pids+=($!)
    STARTED+=($!)
  done
  for k in "${pids[@]}"; do
    wait "$k" || true
  done
  for k in "${files[@]}"; do
    if [ ! -s "$k" ]; then
      echo "$SCRIPT: a generator shard failed:" >&2
      cat "$WORK/$label"-*.bench.log >&2
      return 1
    fi
  done
  "$BENCH_BIN" bench --merge "$(join_by , "${files[@]}")" --label "$label" --report lines \
    "${out[@]}" "$@" "${extra[@]}"
}

pg_bin() { command -v "$1" 2>/dev/null || ls /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | tail -n 1; }

# start_postgres: exports DATABASE_URL for a fresh database, on DATABASE_URL's server when
# set, else on a private PostgreSQL (initdb into the work directory; fsync off, since a bench
# measures herald rather than the disk).
start_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then
    PG_BASE=${DATABASE_URL%/*}
    PG_ADMIN=$DATABASE_URL
  else
    PG_DIR="$WORK/pg"
    chmod 711 "$WORK"
    mkdir -p "$PG_DIR"
    PG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    AS=()
    if [ "$(id -u)" = 0 ]; then chown -R postgres "$PG_DIR"; AS=(runuser -u postgres --); fi
    "${AS[@]}" "$(pg_bin initdb)" -D "$PG_DIR/data" -A trust -U postgres >/dev/null
    "${AS[@]}" "$(pg_bin postgres)" -D "$PG_DIR/data" -p "$PG_PORT" -k "$PG_DIR" \
      -c listen_addresses=127.0.0.1 -c fsync=off >/dev/null 2>&1 &
    STARTED+=("$!")
    for _ in $(seq 1 100); do psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -c 'select 1' postgres >/dev/null 2>&1 && break; sleep 0.1; done
    PG_BASE="postgres://postgres@127.0.0.1:$PG_PORT"
    PG_ADMIN="$PG_BASE/postgres"
  fi
  DB="herald_bench_$$"
  psql "$PG_ADMIN" -qc "CREATE DATABASE $DB" >/dev/null
  if [ -z "${PG_DIR:-}" ]; then PG_SHARED_DB=$DB; fi
  export DATABASE_URL="$PG_BASE/$DB"
}

# wait_rows N: waits (up to 60 s) until the messages table holds at least N rows; prints the count.
wait_rows() {
  local rows=0
  for _ in $(seq 1 600); do
    rows=$(psql "$DATABASE_URL" -tAc "select count(*) from messages")
    [ "$rows" -ge "$1" ] && break
    sleep 0.1
  done
  echo "$rows"
}

# acked_of REPORT: the number of publishes a `herald bench` report counts as acked ok.
acked_of() {
  sed -n 's/.* \([0-9]*\) acked ok.*/\1/p' <<<"$1" | head -n 1
}

# stored_exactly LABEL ACKED STARTED WHAT: waits for the rows, prints their rate since STARTED
# (`date +%s.%N`) followed by WHAT, and fails unless the table holds exactly ACKED rows, each
# with its own id.
stored_exactly() {
  local label=$1 acked=$2 started=$3 what=$4 rows finished distinct
  if ! [ "${acked:-0}" -gt 0 ] 2>/dev/null; then
    echo "$label: FAIL: no publish was acked" >&2
    exit 1
  fi
  rows=$(wait_rows "$acked")
  finished=$(date +%s.%N)
  distinct=$(psql "$DATABASE_URL" -tAc "select count(distinct id) from messages")
  echo "$label: $rows rows for $acked acked messages ($distinct distinct ids), batch size $BATCH_SIZE"
  echo "$label: $(python3 -c "print(f'{$rows / ($finished - $started):,.0f}')") $what"
  if [ "$rows" != "$acked" ] || [ "$distinct" != "$acked" ]; then
    echo "$label: FAIL: expected exactly $acked rows" >&2
    exit 1
  fi
}
