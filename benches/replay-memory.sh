#!/usr/bin/env bash
# Memory after mass recovery: 1 instance holds 20 rooms × 1,000 messages of about 500 bytes
# (memory broker, HERALD_HISTORY_SIZE=1000); then 1,000 Socket.IO clients (the real
# socket.io-client, tests/js/replay-client.mjs) each join one room with `since: 0` and replay
# its whole history, as every client does when it rejoins after a deploy. Reports how long
# the replays took and the instance's RSS per connection once they are done and the
# connections sit idle. A connection keeps its websocket write buffer at the largest size it
# reached, so this is where a replay that outruns the connection's writer shows.
#
#   benches/replay-memory.sh [--smoke]
#
# Fails when a connection costs more than REPLAY_MAX_KIB (96) KiB; before replays were paced
# (`hub::pace`) it cost about 194.
# REPLAY_CLIENTS, REPLAY_PER_ROOM and REPLAY_SIZE change the scenario. Needs node and
# tests/js's packages (npm ci in tests/js).
# --smoke: 100 clients, 100 messages per room; fails unless every replay completes.

source "$(dirname "$0")/common.bash"

raise_nofile 20000
need_js_packages socket.io-client
if [ "$SMOKE" = 1 ]; then
  clients=100 per_room=100
else
  clients=${REPLAY_CLIENTS:-1000} per_room=${REPLAY_PER_ROOM:-1000}
fi
export HERALD_API_KEY=${HERALD_API_KEY:-bench-api-key-$RANDOM-$RANDOM}
export HERALD_HISTORY_SIZE=$per_room HERALD_MAX_USER_CONNECTIONS=0
start_herald a
pid=${SERVER_PIDS[0]}
token=$("$HERALD_BIN" token --sub replay --ttl 1h)
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

mkfifo "$WORK/hold"
URL=${URLS[0]} TOKEN=$token API_KEY=$HERALD_API_KEY CLIENTS=$clients ROOMS=20 \
  PER_ROOM=$per_room SIZE=${REPLAY_SIZE:-500} node "$ROOT/tests/js/replay-client.mjs" \
  <"$WORK/hold" >"$WORK/client.out" 2>"$WORK/client.log" &
client=$!
STARTED+=("$client")
exec 3>"$WORK/hold"

before=""
for _ in $(seq 1 1200); do
  if [ -z "$before" ] && grep -q '^published' "$WORK/client.out"; then
    before=$(rss_kib "$pid")
  fi
  grep -q '^ready' "$WORK/client.out" && break
  kill -0 "$client" 2>/dev/null || break
  sleep 0.1
done
if ! grep -q '^ready' "$WORK/client.out"; then
  echo "$SCRIPT: the replays did not complete:" >&2
  cat "$WORK/client.out" "$WORK/client.log" >&2
  exit 1
fi
sleep 3  # freed pages go back to the system after a second (jemalloc's decay)
after=$(rss_kib "$pid")
exec 3>&-
wait "$client" || true
sed -n 's/^replayed/replay: replayed/p' "$WORK/client.out"
per_conn=$(awk -v b="$before" -v a="$after" -v n="$clients" 'BEGIN { printf "%.1f", (a - b) / n }')
awk -v b="$before" -v a="$after" -v n="$clients" -v k="$per_conn" 'BEGIN {
  printf "replay: rss %.1f -> %.1f MiB with %d idle connections after their replays: %s KiB per connection\n",
    b / 1024, a / 1024, n, k }'
if [ "$SMOKE" = 0 ] && awk -v k="$per_conn" -v max="${REPLAY_MAX_KIB:-96}" 'BEGIN { exit !(k > max) }'; then
  echo "replay: FAIL: more than ${REPLAY_MAX_KIB:-96} KiB per connection" >&2
  exit 1
fi
