#!/usr/bin/env bash
# Bar 3, many connections: 20,000 Socket.IO connections over 2 instances + Redis, in 200 rooms
# × 100 members, then broadcast rounds: each of the 200 rooms gets one message per round
# (200 senders, one per room), 5 rounds, so every connection receives 5 messages (100,000
# deliveries). Passes with zero connect failures, zero loss and p99 ≤ 100 ms.
#
#   benches/bar3-broadcast.sh [--smoke]
#
# --smoke: 400 connections, 3 rounds; fails on any loss, duplicate or connect failure.
# See benches/common.bash for HERALD_BIN, REDIS_URL, BENCH_OUT and BENCH_ARGS.

source "$(dirname "$0")/common.bash"

raise_nofile 20000
start_redis
start_herald a
start_herald b

# Two generator processes, 10,000 connections each: one process may not hold 20,000 sockets
# under this machine's open-files limit (20,000, which only root with CAP_SYS_RESOURCE lifts).
if [ "$SMOKE" = 1 ]; then
  run_sharded bar3-smoke 2 --clients 400 --rooms 20 --members 20 --senders 20 --rate 40 --count 3 \
    --duration 10s --connect-concurrency 50 --strict
else
  # 200 senders at 400 msgs/s in total: each sends every 0.5 s, so a round lasts 0.5 s.
  # 100 connections in flight per generator process, 200 in all.
  run_sharded bar3 2 --clients 20000 --rooms 200 --members 100 --senders 200 --rate 400 --count 5 \
    --duration 30s --connect-concurrency 100 --connect-timeout 30s --join-timeout 60s \
    --strict --max-p99 100ms
fi
