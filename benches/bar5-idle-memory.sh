#!/usr/bin/env bash
# Bar 5, memory: 10,000 idle Socket.IO connections (connected, no rooms) held on one instance.
# Passes when (RSS with the connections open − RSS at start) / connections ≤ 12 KiB.
#
#   benches/bar5-idle-memory.sh [--smoke]
#
# --smoke: 500 connections held 2 s; fails on any connect failure (no memory bar: debug
# builds and small counts do not say much about it).
# See benches/common.bash for HERALD_BIN, BENCH_OUT and BENCH_ARGS.

source "$(dirname "$0")/common.bash"

raise_nofile 20000
start_herald a

if [ "$SMOKE" = 1 ]; then
  run_bench bar5-smoke --clients 500 --rooms 0 --idle --duration 2s --connect-concurrency 50 \
    --strict
else
  # Hold 10 s so that the RSS at the end is the settled cost of idle connections.
  run_bench bar5 --clients 10000 --rooms 0 --idle --duration 10s --connect-concurrency 200 \
    --strict --max-rss-per-conn-kib 12
fi
