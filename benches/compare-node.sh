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
# COMPARE_IDLE=1: bar 5's scenario instead, 10,000 idle Socket.IO connections on one server
# of each, for the RSS each connection costs.
# Needs node and tests/js's packages (npm ci in tests/js).
# --smoke: 200 clients, 10 rooms × 20, 100 msgs/s for 3 s; fails on any loss or failure.

source "$(dirname "$0")/common.bash"

raise_nofile 20000
start_redis

servers=(a b)
if [ "${COMPARE_IDLE:-0}" = 1 ]; then
  servers=(a)
  scenario=(--clients 10000 --rooms 0 --idle --duration 10s --connect-concurrency 200)
  [ "$SMOKE" = 1 ] && scenario=(--clients 500 --rooms 0 --idle --duration 2s
    --connect-concurrency 50 --strict)
elif [ "$SMOKE" = 1 ]; then
  scenario=(--clients 200 --rooms 10 --members 20 --senders 10 --rate 100 --duration 3s
    --connect-concurrency 50 --strict)
else
  scenario=(--clients 5000 --rooms 50 --members 100 --senders 100 --rate "${COMPARE_RATE:-500}"
    --duration 20s --connect-concurrency 200)
fi

for name in "${servers[@]}"; do start_node "node-$name"; done
run_bench node "${scenario[@]}"
stop "${SERVER_PIDS[@]}"
SERVER_PIDS=()
URLS=()

for name in "${servers[@]}"; do start_herald "$name"; done
run_bench herald "${scenario[@]}"
