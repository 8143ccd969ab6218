"""Failures at a site: logged in full at the site, reported to the server only as a reason code.

An exception that escaped a ClientApp function would reach the server as Flower's error reply,
whose text is ``str(exception)``: file paths, case names, library messages. Instead the ClientApp
catches it, logs the traceback at the site (where the operator can read it) and replies with a
refusal carrying one of :data:`CODES`, which the server records under ``excluded``.
"""

from __future__ import annotations

from data_prep.site_dataset import DatasetError

# code -> what the coordinator reads next to it (never anything from the site's data)
CODES = {
    "dataset-invalid": "the site's dataset failed validation; the site's log names the file",
    "dataset-unreadable": "a file of the site's dataset could not be read; the site's log names it",
    "site-config-invalid": "the site's node or run configuration is not valid; see the site's log",
    "out-of-memory": "the site ran out of memory; see the site's log",
    "message-invalid": "the server's message did not fit this site's model or contract; see the site's log",
    "internal-error": "unexpected error at the site; the traceback is in the site's log",
}


class SiteDataError(RuntimeError):
    """A site-side problem whose message may name site files: never sent, only its code."""

    def __init__(self, message: str, code: str = "dataset-invalid") -> None:
        super().__init__(message)
        self.code = code


def failure_code(exc: BaseException) -> str:
    """The reason code of an exception (only its class decides, never its text)."""
    from app.config_values import ConfigError  # local: keeps this module import-light

    if isinstance(exc, SiteDataError):
        return exc.code
    if isinstance(exc, DatasetError):
        return "dataset-invalid"
    if isinstance(exc, ConfigError):
        return "site-config-invalid"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "out-of-memory"
    if isinstance(exc, (OSError, EOFError)) or type(exc).__module__.split(".")[0] in ("nibabel", "pydicom"):
        return "dataset-unreadable"
    if isinstance(exc, KeyError):
        return "message-invalid"
    return "internal-error"


def refusal_reason(code: str) -> str:
    """The text the server stores for a failed site: the code and its fixed explanation."""
    return f"site-failure {code}: {CODES[code]}"
