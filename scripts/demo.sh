#!/usr/bin/env bash
# The main job on the embedded defaults: `backvault demo` (see README). It installs what it
# needs, then runs the whole story offline: a sample chat store, an embedded vault on
# loopback, backup with a password, the phone lost, a restore with just the password.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bootstrap.sh
source "$ROOT/scripts/bootstrap.sh"
exec backvault demo "$@"
