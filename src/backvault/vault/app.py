"""Where the HTTP API was before it became the package ``backvault.vault.api``; the CLI's
``backvault vault openapi`` still imports it from here."""

from backvault.vault.api import create_app, openapi_document

__all__ = ["create_app", "openapi_document"]
