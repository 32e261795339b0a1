"""Every model the registered preprocessors may need, gathered from the registry.

Preprocessor modules own their :class:`ModelSpec` constants; this module only
collects them (and records which preprocessor/variant uses each), so a spec is
written exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine import registry
from engine.models.store import ModelSpec
from guideflow.errors import InvalidParameter


@dataclass(frozen=True)
class CatalogEntry:
    spec: ModelSpec
    used_by: tuple[str, ...]  # "preprocessor/variant"


def catalog() -> dict[str, CatalogEntry]:
    """All model specs by name, in registry order."""
    users: dict[str, list[str]] = {}
    specs: dict[str, ModelSpec] = {}
    for name, proc in registry.available().items():
        for variant in proc.variants:
            for spec in proc.models(variant):
                specs.setdefault(spec.name, spec)
                users.setdefault(spec.name, []).append(f"{name}/{variant}")
    return {n: CatalogEntry(specs[n], tuple(users[n])) for n in specs}


def get_spec(name: str) -> ModelSpec:
    """The spec called ``name``, or ``invalidParameter`` listing the known names."""
    entries = catalog()
    if name not in entries:
        raise InvalidParameter(
            f"unknown model {name!r}; known models: {', '.join(sorted(entries))}",
            parameter="model",
        )
    return entries[name].spec
