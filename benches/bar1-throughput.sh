#!/usr/bin/env bash
# Bar 1, throughput: 2 instances + Redis; 5,000 Socket.IO clients in 50 rooms × 100 members;
# 100 senders at 2,500 msgs/s in total, i.e. 250,000 deliveries/s. Passes with
# ≥ 250,000 deliveries/s sustained, p99 ≤ 50 ms and zero loss.
#
#   benches/bar1-throughput.sh [--smoke]
#
# --smoke: 200 clients for 3 s; fails on any loss, duplicate or connect failure.
# See benches/common.bash for HERALD_BIN, REDIS_URL, BENCH_OUT and BENCH_ARGS.

source "$(dirname "$0")/common.bash"

raise_nofile 20000
start_redis
start_herald a
start_herald b

if [ "$SMOKE" = 1 ]; then
  run_bench bar1-smoke --clients 200 --rooms 10 --members 20 --senders 10 --rate 100 \
    --duration 3s --connect-concurrency 50 --strict
else
  run_bench bar1 --clients 5000 --rooms 50 --members 100 --senders 100 --rate 2500 \
    --duration 20s --connect-concurrency 200 --strict \
    --min-delivery-rate 250000 --max-p99 50ms
fi
