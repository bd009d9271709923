#!/usr/bin/env bash
# One command on a fresh machine: install what the benchmark needs, then run it.
# Usage: bench/run.sh            (BENCH_QUICK=1 bench/run.sh for a shorter run)
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  (service nginx stop || true) >/dev/null 2>&1
fi
PATH="$PATH:/usr/sbin"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
exec .venv/bin/python bench/run.py
