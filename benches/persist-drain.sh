#!/usr/bin/env bash
# The worker's own rate: how fast a backlog in the persist stream reaches PostgreSQL, as after
# a database outage or when workers were stopped. 1 instance + Redis + PostgreSQL: the
# instance runs without its worker (HERALD_WORKER=off) while 100 senders publish into 100
# rooms, so every message waits in the Redis persist stream; then the instance stops and a
# standalone `herald worker` stores the backlog. Reports rows/s from the worker's first read to
# the last committed row, and checks that the table holds exactly the acked messages.
#
#   benches/persist-drain.sh [--smoke]
#
# DRAIN_RATE: messages/s offered while filling (default 10000, for 20 s). BATCH_SIZE defaults
# to 1000 here. Uses DATABASE_URL's server when set, else a private PostgreSQL.
# --smoke: 1,000 messages; fails on any loss or duplicate.

source "$(dirname "$0")/common.bash"

raise_nofile 20000
start_postgres
export BATCH_SIZE=${BATCH_SIZE:-1000} BATCH_TIMEOUT=${BATCH_TIMEOUT:-100ms}

start_redis
HERALD_WORKER=off start_herald a

if [ "$SMOKE" = 1 ]; then
  rate=500 duration=2s
else
  rate=${DRAIN_RATE:-10000} duration=20s
fi
report=$(run_bench drain-fill --clients 100 --rooms 100 --members 1 --senders 100 --rate "$rate" \
  --duration "$duration" --connect-concurrency 100 || true)
acked=$(acked_of "$report")
stop "${SERVER_PIDS[@]}"
backlog=$(redis-cli -u "$BENCH_REDIS_URL" XLEN "herald:persist:bench-$$")
echo "drain: $acked acked messages published with no worker running; $backlog waiting in the persist stream"
if [ "$backlog" != "$acked" ]; then
  echo "drain: FAIL: the persist stream holds $backlog entries for $acked acked messages" >&2
  exit 1
fi

env -u HERALD_BIN REDIS_URL="$BENCH_REDIS_URL" HERALD_REDIS_KEY="bench-$$" PORT=0 HERALD_HOST=127.0.0.1 \
  WORKER_ID=drain RUST_LOG="${RUST_LOG:-warn,herald_server=info}" "$HERALD_BIN" worker \
  >/dev/null 2>"$WORK/worker.log" &
worker=$!
STARTED+=("$worker")
# The clock starts once the worker has connected to the store and is about to read.
for _ in $(seq 1 100); do
  grep -q "worker listening" "$WORK/worker.log" && break
  kill -0 "$worker" 2>/dev/null || { echo "drain: herald worker exited" >&2; exit 1; }
  sleep 0.02
done
started=$(date +%s.%N)
stored_exactly drain "$acked" "$started" \
  "rows/s from the worker's first read to the last committed row"
