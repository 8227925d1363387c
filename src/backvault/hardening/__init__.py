"""What a process holding keys does to keep them in: no core dumps, and no secrets handed
down to child processes through the environment. ``private_files`` writes the files only
the user may read (0600, atomically, never through a symlink).

Every package may use this one (it imports nothing of backvault's).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import sys
from collections.abc import Mapping

# The variables that carry a secret into backvault. Scripts and CI set them; nothing we
# start needs them, so no child gets them.
SECRET_VARIABLES = (
    "BACKVAULT_KEY",
    "BACKVAULT_PASSWORD",
    "BACKVAULT_NEW_PASSWORD",
    "BACKVAULT_VAULT_TOKEN",
)
# Any other BACKVAULT_ variable named like a secret (the vault's PKCS11_PIN, say) is kept
# from children too; BACKVAULT_KEYRING, BACKVAULT_REPO, … are not secrets and stay.
_SECRET_WORD = re.compile(r"(^|_)(KEY|PASSWORD|PASSPHRASE|TOKEN|PIN|SECRET)(_|$)")

_withdrawn: dict[str, str] = {}

_PR_SET_DUMPABLE = 4


def is_secret_variable(name: str) -> bool:
    return name in SECRET_VARIABLES or (
        name.startswith("BACKVAULT_") and bool(_SECRET_WORD.search(name[len("BACKVAULT_") :]))
    )


def scrubbed_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: ours (or ``base``) without secrets."""
    source = os.environ if base is None else base
    return {name: value for name, value in source.items() if not is_secret_variable(name)}


def withdraw_secrets_from_environment() -> None:
    """Move every secret variable out of ``os.environ`` into this process's memory.

    Call it once, at start, before any thread or child exists. Worker processes are
    started by ``multiprocessing``, which passes no environment of its own choosing: they
    inherit ``os.environ``, so the secrets must not be there. ``environment_value`` still
    finds them for the code that reads them."""
    for name in [name for name in os.environ if is_secret_variable(name)]:
        _withdrawn[name] = os.environ.pop(name)


def environment_value(name: str) -> str | None:
    """A variable's value, withdrawn or still in the environment; None if unset."""
    return _withdrawn[name] if name in _withdrawn else os.environ.get(name)


def secret_variable(name: str) -> str | None:
    """A secret variable's value, or None if it is unset or empty."""
    return environment_value(name) or None


def disable_core_dumps() -> None:
    """No core file, and (Linux) not dumpable at all: a crash must not write the master
    key, the slot secret or the vault token to disk, and other processes of the same user
    may not ptrace us or read our memory through /proc."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            prctl = ctypes.CDLL(None, use_errno=True).prctl
            prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
            prctl.restype = ctypes.c_int
            prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
