#!/usr/bin/env bash
# The durable path: 1 instance + Redis + PostgreSQL; 100 senders publish as fast as the target
# rate allows into 100 rooms, and every message goes through the Redis persist stream and the
# batching worker into PostgreSQL (one COPY per batch, up to 3 batches at once).
# Reports messages/s from the first publish to the last committed row, and checks that the
# table holds exactly the acked messages: no loss, no duplicates.
#
#   benches/persist-throughput.sh [--smoke]
#
# PERSIST_API_BATCH=N: PERSIST_API_SENDERS (8) publishers POST batches of N messages to
# /api/publish instead (a backend publishing in bulk), each waiting for its answer before the
# next; the 100 clients only receive.
# PERSIST_RATE: messages/s offered (20,000); PERSIST_DURATION: how long they are offered (10s).
# PERSIST_SUBSCRIBERS=0 (with PERSIST_API_BATCH): nobody joins the rooms, so the run measures
# publishing and storing alone, without delivering every message to a socket as well (one
# client stays connected, in no room).
# Uses DATABASE_URL's server when set (a fresh database is created in it), else a private
# PostgreSQL (initdb into a temporary directory). BATCH_SIZE defaults to 1000 here.
# --smoke: 1,000 messages; fails on any loss or duplicate.

source "$(dirname "$0")/common.bash"

raise_nofile 20000
senders=(--senders 100)
audience=(--clients 100 --members 1)
if [ "${PERSIST_SUBSCRIBERS:-1}" = 0 ]; then
  if [ -z "${PERSIST_API_BATCH:-}" ]; then
    echo "$SCRIPT: PERSIST_SUBSCRIBERS=0 needs PERSIST_API_BATCH (socket senders are members)" >&2
    exit 2
  fi
  audience=(--clients 1 --members 0)
fi
if [ -n "${PERSIST_API_BATCH:-}" ]; then
  export HERALD_API_KEY=${HERALD_API_KEY:-bench-api-key-$RANDOM-$RANDOM}
  senders=(--senders "${PERSIST_API_SENDERS:-8}" --api-batch "$PERSIST_API_BATCH" --api-key "$HERALD_API_KEY")
fi

start_postgres
export BATCH_SIZE=${BATCH_SIZE:-1000} BATCH_TIMEOUT=${BATCH_TIMEOUT:-100ms}

start_redis
start_herald a

if [ "$SMOKE" = 1 ]; then
  rate=500 duration=2s
else
  rate=${PERSIST_RATE:-20000} duration=${PERSIST_DURATION:-10s}
fi
started=$(date +%s.%N)
# Not --strict: publishes still in flight when the run ends are neither acked nor stored, and
# the check below compares the table with the acked messages.
report=$(run_bench persist "${audience[@]}" --rooms 100 "${senders[@]}" --rate "$rate" \
  --duration "$duration" --connect-concurrency 100 || true)
echo "$report"
stored_exactly persist "$(acked_of "$report")" "$started" \
  "messages/s from the first publish to the last committed row"
