#!/usr/bin/env bash
# A head + worker Ray cluster on this machine: cluster/local.sh up|down|status [--workers N] (see cluster/local.py).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m cluster.local "$@"
