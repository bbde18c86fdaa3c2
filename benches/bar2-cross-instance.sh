#!/usr/bin/env bash
# Bar 2, cross-instance latency: 2 instances + Redis; 1,000 Socket.IO clients in 100 rooms × 10
# members (every room has members on both instances); 100 senders at 10,000 msgs/s in total.
# Passes with a p99 ≤ 5 ms for deliveries whose sender is on the other instance, and zero loss.
#
#   benches/bar2-cross-instance.sh [--smoke]
#
# --smoke: 100 clients for 3 s; fails on any loss, duplicate or connect failure.
# See benches/common.bash for HERALD_BIN, REDIS_URL, BENCH_OUT and BENCH_ARGS.

source "$(dirname "$0")/common.bash"

raise_nofile 20000
start_redis
start_herald a
start_herald b

if [ "$SMOKE" = 1 ]; then
  run_bench bar2-smoke --clients 100 --rooms 10 --members 10 --senders 10 --rate 200 \
    --duration 3s --connect-concurrency 50 --strict
else
  run_bench bar2 --clients 1000 --rooms 100 --members 10 --senders 100 --rate 10000 \
    --duration 20s --connect-concurrency 200 --strict --max-cross-p99 5ms
fi
