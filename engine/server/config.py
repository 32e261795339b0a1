"""Server configuration: one frozen dataclass, built by the CLI or by tests.

Everything the server does that can be tuned (or must be faked in tests: the
clock, the network policy, the engine) lives here, so :func:`create_app` is a
pure factory of its config.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.api import Engine
from engine.imageio import DEFAULT_LIMITS, ImageLimits
from engine.server.faults import FaultConfig
from guideflow.netguard import NetPolicy
from guideflow.pricing import PriceTable

DEFAULT_API_KEY_ENV = "GUIDEFLOW_API_KEYS"


def _cpu_count() -> int:
    return os.cpu_count() or 1


def load_api_keys(env_name: str = DEFAULT_API_KEY_ENV) -> tuple[str, ...]:
    """The comma-separated API keys in the environment variable ``env_name`` (blanks dropped)."""
    raw = os.environ.get(env_name, "")
    return tuple(k.strip() for k in raw.split(",") if k.strip())


@dataclass(frozen=True)
class ServerConfig:
    """All settings of ``guideflow serve``.

    ``queue_size`` bounds the tasks admitted at once (queued + running, sync and
    async alike; ``None`` = max(256, 32 × ``workers``), so a pipeline's batches of
    20 tasks from several shards fit). ``ttl`` is the default lifetime of a
    guide image URL, ``upload_ttl`` the lifetime of an uploaded (or inline) input
    image, refreshed each time it is used. Stored bytes never exceed
    ``storage_max_bytes``: the oldest images are evicted first. ``storage_dir``
    ``None`` means a private temporary directory removed at shutdown. Task records
    live ``job_ttl`` after finishing, at most ``max_jobs`` of them; they hold no image
    data (~1.7 KB each, so the default 100,000 is about 170 MB; see :mod:`.jobs`).
    ``faults`` turns on fault injection (TEST ONLY, see :mod:`engine.server.faults`);
    ``None``, the default, leaves the server untouched.
    """

    api_keys: tuple[str, ...] = ()
    no_auth: bool = False
    workers: int = field(default_factory=_cpu_count)
    queue_size: int | None = None
    public_url: str | None = None
    ttl: int = 86_400
    upload_ttl: int = 86_400
    storage_dir: Path | None = None
    storage_max_bytes: int = 2 * 1024**3
    sweep_interval: float = 60.0
    max_body_bytes: int = 64 * 1024**2
    image_limits: ImageLimits = DEFAULT_LIMITS
    net_policy: NetPolicy = field(default_factory=NetPolicy)
    fetch_timeout: float = 30.0
    webhook_attempts: int = 5
    webhook_backoff: float = 0.5
    retry_after: int = 1
    job_ttl: int = 86_400
    max_jobs: int = 100_000
    prices: PriceTable = field(default_factory=PriceTable.load)
    engine: Engine | None = None
    clock: Callable[[], float] = time.time
    faults: FaultConfig | None = None

    @property
    def capacity(self) -> int:
        """How many tasks may be queued or running at once."""
        return self.queue_size if self.queue_size is not None else max(256, 32 * self.workers)

    @property
    def auth_required(self) -> bool:
        return not self.no_auth

    def validate(self) -> None:
        """Refuse configurations that would run insecurely or not at all (``ValueError``)."""
        if not self.no_auth and not self.api_keys:
            raise ValueError(
                "no API keys configured: set the API key environment variable "
                f"(default {DEFAULT_API_KEY_ENV}) or pass --no-auth explicitly"
            )
        positive = {
            "workers": self.workers,
            "queue_size": self.capacity,
            "ttl": self.ttl,
            "upload_ttl": self.upload_ttl,
            "storage_max_bytes": self.storage_max_bytes,
            "max_body_bytes": self.max_body_bytes,
            "webhook_attempts": self.webhook_attempts,
            "max_jobs": self.max_jobs,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.sweep_interval <= 0 or self.webhook_backoff < 0 or self.fetch_timeout <= 0:
            raise ValueError("sweep_interval and fetch_timeout must be > 0, webhook_backoff >= 0")
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ValueError(f"public_url must be an http(s) URL, got {self.public_url!r}")
        if self.faults is not None:
            self.faults.validate()
