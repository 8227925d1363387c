#!/usr/bin/env bash
# Installs what backvault needs on a fresh machine, idempotently:
# Debian packages when run as root (restic, libsodium), a virtual env in .venv,
# and the package with its development extras. Sourced by scripts/test.sh and scripts/demo.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BACKVAULT_VENV:-$ROOT/.venv}"

need_debs=()
command -v restic >/dev/null 2>&1 || need_debs+=(restic)
ldconfig -p 2>/dev/null | grep -q 'libsodium\.so' || need_debs+=(libsodium23)
# The vault's tests: a throwaway PostgreSQL cluster and a SoftHSM2 token.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_debs+=(postgresql)
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need_debs+=(softhsm2)
command -v setpriv >/dev/null 2>&1 || need_debs+=(util-linux)
# Storage backends' tests: `rclone serve restic` (and rclone remotes).
command -v rclone >/dev/null 2>&1 || need_debs+=(rclone)
if ((${#need_debs[@]})); then
    if [ "$(id -u)" = 0 ]; then
        echo "bootstrap: installing Debian packages: ${need_debs[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq "${need_debs[@]}" >/dev/null
    else
        echo "bootstrap: missing ${need_debs[*]}; install them (e.g. sudo apt-get install ${need_debs[*]})" >&2
    fi
fi

stamp="$VENV/.backvault-installed"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    log="$VENV/pip-install.log"
    if ! { "$VENV/bin/python" -m pip install -q --upgrade pip &&
           "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"; } >"$log" 2>&1; then
        cat "$log" >&2
        echo "bootstrap: installing the Python packages failed (log above)" >&2
        exit 1
    fi
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
