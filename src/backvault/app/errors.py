"""The errors workflows raise. Each says in its message what a person should do; the
command line chooses the exit code (``backvault.cli.main.ERROR_CODES``)."""

from __future__ import annotations


class AppError(Exception):
    """A workflow refused or could not finish (exit code 1)."""


class InvalidArgument(AppError):
    """A value given to a workflow is malformed (a usage error, exit code 2)."""


class NoSuchKeySlot(AppError):
    pass


class AmbiguousKeySlot(AppError):
    pass


class LastKeySlot(AppError):
    """Removing it would leave a repository nobody can open."""


class NoPasswordSlot(AppError):
    pass


class TooManyEntries(AppError):
    """A snapshot expands to more entries than a listing or a restore accepts (exit code 3:
    the snapshot is damaged or hostile)."""


class WhatsAppKeyMismatch(AppError):
    """A WhatsApp backup file does not open with the key given (exit code 10)."""


class MalformedWhatsAppKey(AppError):
    """What was given as a WhatsApp key is not one (exit code 10, as a malformed key)."""


class WhatsAppFileRefused(AppError):
    """A WhatsApp backup file is damaged, truncated, or in a format not supported."""
