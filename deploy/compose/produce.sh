#!/bin/sh
# The producer of docker-compose.yml: publishes samples/events.jsonl again and again, each
# round with fresh timestamps (one millisecond apart, in file order) and message ids, so that
# the dashboard has traffic and no round is superseded by the one before.
set -eu
samples=${SAMPLES:-/samples/events.jsonl}
interval=${INTERVAL_SECONDS:-5}
round=0
while :; do
  round=$((round + 1))
  now=$(date -u +%Y-%m-%dT%H:%M:%S)
  awk -v now="$now" -v round="$round" '{
    sub(/"timestamp":"[^"]*"/, sprintf("\"timestamp\":\"%s.%03dZ\"", now, NR % 1000))
    sub(/"messageId":"[^"]*"/, sprintf("\"messageId\":\"compose-%d-%d\"", round, NR))
    print
  }' "$samples" > /tmp/round.jsonl
  listrak-worker publish /tmp/round.jsonl
  sleep "$interval"
done
