#!/usr/bin/env bash
# The whole test suite: installs what it needs, then lint, format check, types, tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bootstrap.sh
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
echo "== ruff check" && ruff check src tests bench scripts
echo "== ruff format --check" && ruff format --check src tests bench scripts
echo "== mypy src" && mypy src
echo "== pytest" && pytest "$@"
