#!/usr/bin/env bash
# Bar 5, memory: 10,000 idle Socket.IO connections (connected, no rooms) held on one instance.
# Passes when (RSS with the connections open − RSS at start) / connections ≤ 12 KiB.
#
#   benches/bar5-idle-memory.sh [--smoke]
#
# --smoke: 500 connections held 2 s; fails on any connect failure (no memory bar: debug
# builds and small counts do not say much about it).
# BROWSER_HEADERS=1: every handshake carries the headers a desktop Chrome sends (user agent,
# origin, languages, a cookie…), about 600 bytes more than the bench's own.
# See benches/common.bash for HERALD_BIN, BENCH_OUT and BENCH_ARGS.

source "$(dirname "$0")/common.bash"

raise_nofile 20000
start_herald a

headers=()
if [ "${BROWSER_HEADERS:-0}" = 1 ]; then
  headers=(
    --header 'user-agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36'
    --header 'origin: https://app.example.com'
    --header 'pragma: no-cache'
    --header 'cache-control: no-cache'
    --header 'accept-encoding: gzip, deflate, br, zstd'
    --header 'accept-language: en-GB,en-US;q=0.9,en;q=0.8,de;q=0.7'
    --header 'cookie: _ga=GA1.1.1234567890.1700000000; session=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEyMyJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ; theme=dark'
    --header 'sec-websocket-extensions: permessage-deflate; client_max_window_bits'
  )
fi

if [ "$SMOKE" = 1 ]; then
  run_bench bar5-smoke --clients 500 --rooms 0 --idle --duration 2s --connect-concurrency 50 \
    "${headers[@]}" --strict
else
  # Hold 10 s so that the RSS at the end is the settled cost of idle connections.
  run_bench bar5 --clients 10000 --rooms 0 --idle --duration 10s --connect-concurrency 200 \
    "${headers[@]}" --strict --max-rss-per-conn-kib 12
fi
