#!/usr/bin/env bash
# Soak: 2 instances + Redis at moderate load for a long time: 200 Socket.IO clients in 20 rooms
# × 10 members (every room has members on both instances), 20 senders at 200 msgs/s in total,
# so 2,000 deliveries/s. Every instance's RSS (VmRSS) and open file descriptors are sampled
# every --interval into a CSV; one line per figure gives its value after warm-up (start), at
# the end of the load, its maximum, its growth from start to end, and after the clients left.
# Fails on any loss, duplicate or connect failure, or when an instance's growth after warm-up
# exceeds SOAK_MAX_RSS_GROWTH_MIB (default 8) or SOAK_MAX_FD_GROWTH (default 10).
#
#   benches/soak.sh [--smoke] [--duration 30m] [--interval 10s] [--warmup 2m]
#
# --duration: how long the load runs (default 30m). --interval: the sampling period (default
# 10s). --warmup: samples before this are not counted in the growth (default 2m, at most a
# third of the duration). The CSV is kept as soak.csv in BENCH_OUT when set.
# --smoke: 6 s at 100 msgs/s, sampled every second; checks the mechanics and zero loss.
# See benches/common.bash for HERALD_BIN, REDIS_URL, BENCH_OUT and BENCH_ARGS.

# Soak options are read here; common.bash handles the rest.
duration=30m interval=10s warmup=2m
rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --duration | --interval | --warmup)
      [ $# -ge 2 ] || { echo "soak: $1 needs a value" >&2; exit 2; }
      declare "${1#--}=$2"
      shift 2
      ;;
    *)
      rest+=("$1")
      shift
      ;;
  esac
done
set -- "${rest[@]}"

source "$(dirname "$0")/common.bash"

# seconds 30m → 1800 (s, m and h suffixes; a bare number is seconds).
seconds() {
  case "$1" in
    *h) echo $((${1%h} * 3600)) ;;
    *m) echo $((${1%m} * 60)) ;;
    *s) echo "${1%s}" ;;
    *) echo "$1" ;;
  esac
}

if [ "$SMOKE" = 1 ]; then
  duration=6s interval=1s warmup=2s
  clients=100 rooms=10 senders=10 rate=100
else
  clients=200 rooms=20 senders=20 rate=200
fi
duration_s=$(seconds "$duration")
interval_s=$(seconds "$interval")
warmup_s=$(seconds "$warmup")
[ "$warmup_s" -le $((duration_s / 3)) ] || warmup_s=$((duration_s / 3))
max_rss_growth_kib=$((${SOAK_MAX_RSS_GROWTH_MIB:-8} * 1024))
max_fd_growth=${SOAK_MAX_FD_GROWTH:-10}

raise_nofile 20000
start_redis
start_herald a
start_herald b

csv="$WORK/soak.csv"
echo "seconds,phase,instance,pid,rss_kib,fds" >"$csv"
names=(a b)
# sample_once SECONDS PHASE: one row per instance.
sample_once() {
  local k pid rss fds
  for k in "${!SERVER_PIDS[@]}"; do
    pid=${SERVER_PIDS[$k]}
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || return 1
    fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    echo "$1,$2,${names[$k]},$pid,$rss,$fds" >>"$csv"
  done
}
# The sampler: every interval until the load ends (or an instance is gone).
T0=$SECONDS
(
  while sample_once $((SECONDS - T0)) load; do
    sleep "$interval_s"
  done
) &
SAMPLER=$!
STARTED+=("$SAMPLER")

echo "soak: $clients clients, $rooms rooms, $senders senders at $rate msgs/s for $duration; sampling every ${interval_s}s, warm-up ${warmup_s}s"
status=0
report=$(run_bench soak --clients "$clients" --rooms "$rooms" --members 10 --senders "$senders" \
  --rate "$rate" --duration "$duration" --connect-concurrency 50 --strict) || status=$?
echo "$report"
# One last sample once the clients have gone, before the instances stop.
kill "$SAMPLER" 2>/dev/null || true
wait "$SAMPLER" 2>/dev/null || true
sample_once $((SECONDS - T0)) after || {
  echo "soak: FAIL: an instance is gone" >&2
  exit 1
}
if [ -n "${BENCH_OUT:-}" ]; then
  mkdir -p "$BENCH_OUT"
  cp "$csv" "$BENCH_OUT/soak.csv"
fi

# Per instance and figure: first (idle, before the clients), start (the first sample at or
# after warm-up), end (the last under load), max, growth (end - start), and after (once the
# clients have gone). Fails on growth over the limit, or on descriptors left open after.
summary=$(awk -F, -v warm="$warmup_s" -v max_rss="$max_rss_growth_kib" -v max_fds="$max_fd_growth" '
  NR == 1 { next }
  $2 == "after" { after_rss[$3] = $5; after_fds[$3] = $6; next }
  {
    i = $3
    if (!(i in first_rss)) { first_rss[i] = $5; first_fds[i] = $6 }
    if (!(i in start_rss) && $1 >= warm) { start_rss[i] = $5; start_fds[i] = $6; start_t[i] = $1 }
    end_rss[i] = $5; end_fds[i] = $6; end_t[i] = $1
    if ($5 > peak_rss[i]) peak_rss[i] = $5
    if ($6 > peak_fds[i]) peak_fds[i] = $6
    n[i]++
  }
  END {
    bad = 0
    for (i in n) {
      if (!(i in start_rss)) { start_rss[i] = end_rss[i]; start_fds[i] = end_fds[i]; start_t[i] = end_t[i] }
      g = end_rss[i] - start_rss[i]
      printf "soak: rss %s: first %.1f MiB, start %.1f MiB (%ds), end %.1f MiB (%ds), max %.1f MiB, growth %+.1f MiB (limit %d), after %.1f MiB; %d samples\n",
        i, first_rss[i] / 1024, start_rss[i] / 1024, start_t[i], end_rss[i] / 1024, end_t[i], peak_rss[i] / 1024, g / 1024, max_rss / 1024, after_rss[i] / 1024, n[i]
      if (g > max_rss) { printf "soak: FAIL: instance %s RSS grew %.1f MiB after warm-up\n", i, g / 1024; bad = 1 }
      g = end_fds[i] - start_fds[i]
      printf "soak: fds %s: first %d, start %d, end %d, max %d, growth %+d (limit %d), after %d\n",
        i, first_fds[i], start_fds[i], end_fds[i], peak_fds[i], g, max_fds, after_fds[i]
      if (g > max_fds) { printf "soak: FAIL: instance %s open files grew by %d after warm-up\n", i, g; bad = 1 }
      if (after_fds[i] > first_fds[i] + max_fds) { printf "soak: FAIL: instance %s holds %d files after the clients left, %d before\n", i, after_fds[i], first_fds[i]; bad = 1 }
    }
    exit bad
  }' "$csv" | sort) || true
echo "$summary"
grep -q "FAIL" <<<"$summary" && status=1
loss=$(grep -m 1 'loss:' <<<"$report" || true)
delivered=$(grep -m 1 'delivered:' <<<"$report" || true)
echo "soak: summary: $duration at $rate msgs/s; ${delivered#*: }; ${loss#*: }"
exit "$status"
