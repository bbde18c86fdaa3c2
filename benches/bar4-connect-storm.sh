#!/usr/bin/env bash
# Bar 4, connect storm: 10,000 Socket.IO connections, each with its own JWT, 200 in flight, to
# one instance. Passes with zero failures and ≥ 5,000 connections/s (from the first attempt
# to the last Socket.IO connect).
#
#   benches/bar4-connect-storm.sh [--smoke]
#
# --smoke: 500 connections, 50 in flight; fails on any connect failure.
# See benches/common.bash for HERALD_BIN, BENCH_OUT and BENCH_ARGS.

source "$(dirname "$0")/common.bash"

raise_nofile 20000
start_herald a

if [ "$SMOKE" = 1 ]; then
  run_bench bar4-smoke --clients 500 --rooms 0 --idle --duration 1s --connect-concurrency 50 \
    --strict
else
  run_bench bar4 --clients 10000 --rooms 0 --idle --duration 1s --connect-concurrency 200 \
    --strict --min-connect-rate 5000
fi
