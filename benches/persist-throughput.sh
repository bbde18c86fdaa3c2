#!/usr/bin/env bash
# The durable path: 1 instance + Redis + PostgreSQL; 100 senders publish as fast as the target
# rate allows into 100 rooms, and every message goes through the Redis persist stream and the
# batching worker into PostgreSQL (COPY into staging, INSERT … ON CONFLICT DO NOTHING).
# Reports messages/s from the first publish to the last committed row, and checks that the
# table holds exactly the acked messages: no loss, no duplicates.
#
#   benches/persist-throughput.sh [--smoke]
#
# Uses DATABASE_URL's server when set (a fresh database is created in it), else a private
# PostgreSQL (initdb into a temporary directory). BATCH_SIZE defaults to 1000 here.
# --smoke: 1,000 messages; fails on any loss or duplicate.

source "$(dirname "$0")/common.bash"

raise_nofile 20000
pg_bin() { command -v "$1" 2>/dev/null || ls /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | tail -n 1; }

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
export DATABASE_URL="$PG_BASE/$DB" BATCH_SIZE=${BATCH_SIZE:-1000} BATCH_TIMEOUT=${BATCH_TIMEOUT:-100ms}

start_redis
start_herald a

if [ "$SMOKE" = 1 ]; then
  rate=500 duration=2s
else
  rate=${PERSIST_RATE:-20000} duration=10s
fi
started=$(date +%s.%N)
# Not --strict: publishes still in flight when the run ends are neither acked nor stored, and
# the check below compares the table with the acked messages.
report=$(run_bench persist --clients 100 --rooms 100 --members 1 --senders 100 --rate "$rate" \
  --duration "$duration" --connect-concurrency 100 || true)
echo "$report"
acked=$(sed -n 's/.* \([0-9]*\) acked ok.*/\1/p' <<<"$report" | head -n 1)
rows=0
for _ in $(seq 1 600); do
  rows=$(psql "$DATABASE_URL" -tAc "select count(*) from messages")
  [ "$rows" -ge "$acked" ] && break
  sleep 0.1
done
finished=$(date +%s.%N)
distinct=$(psql "$DATABASE_URL" -tAc "select count(distinct id) from messages")
echo "persist: $rows rows for $acked acked messages ($distinct distinct ids), batch size $BATCH_SIZE"
echo "persist: $(python3 -c "print(f'{$rows / ($finished - $started):,.0f}')") messages/s from the first publish to the last committed row"
if [ "$rows" != "$acked" ] || [ "$distinct" != "$acked" ]; then
  echo "persist: FAIL: expected exactly $acked rows" >&2
  exit 1
fi
