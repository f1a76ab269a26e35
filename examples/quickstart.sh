#!/usr/bin/env bash
# The main job: start `msa serve` on the embedded tiny model (a local Ray cluster), answer one
# OpenAI chat request, and stop the server.
set -euo pipefail
port=${PORT:-8000}
log=$(mktemp)
msa serve --model tiny --port "$port" >"$log" 2>&1 &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 180); do
  grep -q "is ready at" "$log" && break
  kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
  sleep 1
done
grep -q "is ready at" "$log" || { cat "$log"; echo "server did not become ready" >&2; exit 1; }
curl -sS --fail-with-body "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16, "seed": 0}'
echo
