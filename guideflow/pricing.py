"""Per-preprocessor prices, used for ``includeCost``, dry-run estimates and budgets.

The defaults are *estimates* taken from Runware's published example responses:
0.0006 USD for a canny-class (classical) preprocess and 0.0013 USD for a
depth-class (model-based) one. Each preprocessor declares its class in the
registry (``Preprocessor.price_class``). Override them with a JSON file or the
``GUIDEFLOW_PRICES`` environment variable, for example
``{"classes": {"canny": 0.0005}, "preprocessors": {"openpose": 0.002}}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CLASS_PRICES: Mapping[str, float] = {"canny": 0.0006, "depth": 0.0013}
ENV_PRICES = "GUIDEFLOW_PRICES"


@dataclass(frozen=True)
class PriceTable:
    """USD per guide image, by price class with optional per-preprocessor overrides."""

    classes: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_CLASS_PRICES))
    preprocessors: Mapping[str, float] = field(default_factory=dict)
    _memo: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    def price(self, preprocessor: str) -> float:
        """The price of one guide image made by ``preprocessor`` (any accepted spelling)."""
        value = self._memo.get(preprocessor)
        if value is None:  # looked up once per spelling: budgets price every image
            value = self._memo[preprocessor] = self._lookup(preprocessor)
        return value

    def _lookup(self, preprocessor: str) -> float:
        from engine import registry

        name = registry.canonical_name(preprocessor)
        if name in self.preprocessors:
            return float(self.preprocessors[name])
        price_class = registry.get(name).price_class
        return float(self.classes.get(price_class, DEFAULT_CLASS_PRICES["depth"]))

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> PriceTable:
        classes = dict(DEFAULT_CLASS_PRICES)
        classes.update({k: float(v) for k, v in dict(data.get("classes", {})).items()})  # type: ignore[call-overload]
        per = {k: float(v) for k, v in dict(data.get("preprocessors", {})).items()}  # type: ignore[call-overload]
        return cls(classes=classes, preprocessors=per)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> PriceTable:
        """From ``path`` (JSON), else ``$GUIDEFLOW_PRICES`` (JSON or a file path), else defaults."""
        if path is not None:
            return cls.from_mapping(json.loads(Path(path).read_text()))
        env = os.environ.get(ENV_PRICES, "").strip()
        if not env:
            return cls()
        text = Path(env).read_text() if not env.startswith("{") else env
        return cls.from_mapping(json.loads(text))
