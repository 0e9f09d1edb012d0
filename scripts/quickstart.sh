#!/usr/bin/env bash
# The main job on a fresh machine: install, then embed the shipped sample products with the
# trained reference embedder and print the nearest products of a few queries.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m sdk.train.quickstart "$@"
