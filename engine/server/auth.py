"""API-key checks: ``Authorization: Bearer <key>`` or a leading ``authentication`` task."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any


def bearer_token(header: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (``None`` if absent or not Bearer)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def key_is_valid(presented: str, keys: Sequence[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit on a match)."""
    given = presented.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    return ok


def presented_keys(bearer: str | None, tasks: Sequence[Any]) -> list[str]:
    """Every key the request presents: the bearer token and each authentication task's apiKey.

    A malformed (non-string) ``apiKey`` counts as a presented, invalid key.
    """
    keys = [bearer] if bearer is not None else []
    for raw in tasks:
        if isinstance(raw, dict) and raw.get("taskType") == "authentication" and "apiKey" in raw:
            value = raw["apiKey"]
            keys.append(value if isinstance(value, str) else "\x00invalid")
    return keys


def authorized(bearer: str | None, tasks: Sequence[Any], keys: Sequence[str]) -> bool:
    """At least one key presented, and every presented key valid."""
    presented = presented_keys(bearer, tasks)
    results = [key_is_valid(p, keys) for p in presented]
    return bool(results) and all(results)
