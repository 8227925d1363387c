#!/usr/bin/env bash
# The main job on the embedded default (a local folder): make a sample chat store, back it
# up into a new encrypted repository, change it, back up again, lose the device, restore
# with the 64-digit key on a "new device", check the result is identical, and let stock
# restic verify the repository. Everything happens in a temporary folder.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bootstrap.sh
source "$ROOT/scripts/bootstrap.sh"
exec python "$ROOT/scripts/demo.py" "$@"
