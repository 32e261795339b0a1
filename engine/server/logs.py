"""Logging hygiene: API keys, bearer tokens and presigned query strings never reach a log.

The server's own messages already pass URLs through ``redact_url`` and never
log headers; this filter is the second line of defence, installed on the
loggers that could see secrets (ours, netguard's, httpx/httpcore, which log
full request URLs at INFO, and uvicorn's).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from guideflow.netguard import redact_url

WATCHED_LOGGERS: tuple[str, ...] = (
    "guideflow.server",
    "guideflow.netguard",
    "httpx",
    "httpcore",
    "uvicorn.access",
    "uvicorn.error",
)
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")
_SIGNATURE = re.compile(r"(?i)(x-amz-signature|x-goog-signature|signature|sig|token)=[^&\s\"']+")


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with secrets replaced by ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__("guideflow-redact")
        self.secrets = tuple(s for s in secrets if s)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        text = _URL.sub(lambda m: redact_url(m.group(0)), text)
        text = _BEARER.sub(r"\1***", text)
        return _SIGNATURE.sub(r"\1=***", text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler
            return True
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


_FILTER = RedactingFilter()


def install(secrets: Iterable[str]) -> RedactingFilter:
    """Put the process-wide filter on every watched logger and teach it ``secrets``.

    Secrets accumulate (several apps in one process, as in tests, all stay covered).
    """
    _FILTER.secrets = tuple(dict.fromkeys((*_FILTER.secrets, *(s for s in secrets if s))))
    for name in WATCHED_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    return _FILTER
