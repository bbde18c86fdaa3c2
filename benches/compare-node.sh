#!/usr/bin/env bash
# herald and Node side by side, from one run: 2 Node socket.io 4.8 servers on
# @socket.io/redis-adapter 8.3 (tests/js/bench-server.mjs: JWT check, Redis INCR offsets,
# adapter broadcast), then 2 herald instances, on the same private Redis, each driven by the
# same `herald bench` scenario: 5,000 Socket.IO clients, 50 rooms × 100 members, 100 senders
# offering COMPARE_RATE msgs/s (default 500, i.e. 50,000 deliveries/s) for 20 s. Prints each
# run's lines, labelled `node` and `herald`. Not a pass/fail check: the figures are the point.
#
#   benches/compare-node.sh [--smoke]
#
# Needs node and tests/js's packages (npm ci in tests/js).
# --smoke: 200 clients, 10 rooms × 20, 100 msgs/s for 3 s; fails on any loss or failure.

source "$(dirname "$0")/common.bash"

raise_nofile 20000
start_redis

if [ "$SMOKE" = 1 ]; then
  scenario=(--clients 200 --rooms 10 --members 20 --senders 10 --rate 100 --duration 3s
    --connect-concurrency 50 --strict)
else
  scenario=(--clients 5000 --rooms 50 --members 100 --senders 100 --rate "${COMPARE_RATE:-500}"
    --duration 20s --connect-concurrency 200)
fi

start_node node-a
start_node node-b
run_bench node "${scenario[@]}"
stop "${SERVER_PIDS[@]}"
SERVER_PIDS=()
URLS=()

start_herald a
start_herald b
run_bench herald "${scenario[@]}"
