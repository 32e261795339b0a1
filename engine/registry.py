"""One registry for the 12 ControlNet preprocessors, and the typed settings they declare.

Each preprocessor is a small class in ``engine/preprocessors/<name>.py`` that
declares its settings (type, range, default), its variants and the models each
variant needs, and implements :meth:`Preprocessor.process`. The registry turns a
name from either request form (``"lineart_anime"`` or
``"runware:controlnet-preprocess@lineart-anime"``) into that class, and turns raw
settings into validated values or an ``invalidParameter`` error that names the
setting.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from guideflow.errors import InvalidParameter, InvalidPreProcessorType

if TYPE_CHECKING:
    from engine.models.store import ModelSpec, ModelStore

MODEL_ID_PREFIX = "runware:controlnet-preprocess@"

#: The 12 preprocessors of Runware's controlNetPreprocess, in the order its docs list them.
PREPROCESSOR_NAMES: tuple[str, ...] = (
    "canny",
    "depth",
    "mlsd",
    "normalbae",
    "openpose",
    "tile",
    "seg",
    "lineart",
    "lineart_anime",
    "shuffle",
    "scribble",
    "softedge",
)

_SCALARS: dict[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


@dataclass(frozen=True)
class Setting:
    """One typed, range-checked setting of a preprocessor.

    ``name`` is the protocol spelling (camelCase, as Runware writes
    ``lowThresholdCanny``); ``aliases`` are other accepted spellings (the CLI's
    ``low``, the new form's shorter names).
    """

    name: str
    kind: type
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()

    def coerce(self, value: Any, *, owner: str) -> Any:
        """Return ``value`` as this setting's type, or raise ``invalidParameter`` naming it."""
        bad = InvalidParameter(
            f"{owner}: '{self.name}' must be {self._describe()}, got {value!r}",
            parameter=self.name,
        )
        if self.kind is bool:
            if isinstance(value, bool):
                out: Any = value
            elif isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
                out = value.strip().lower() in ("true", "1")
            elif isinstance(value, int) and value in (0, 1):
                out = bool(value)
            else:
                raise bad
        elif self.kind is int:
            if isinstance(value, bool):
                raise bad
            if isinstance(value, int):
                out = value
            elif isinstance(value, float) and value.is_integer():
                out = int(value)
            elif isinstance(value, str):
                try:
                    out = int(value.strip())
                except ValueError:
                    raise bad from None
            else:
                raise bad
        elif self.kind is float:
            if isinstance(value, bool):
                raise bad
            try:
                out = float(value)
            except (TypeError, ValueError):
                raise bad from None
            if not math.isfinite(out):
                raise bad
        else:
            if not isinstance(value, str):
                raise bad
            out = value.strip()
        if self.choices is not None and out not in self.choices:
            raise bad
        if self.minimum is not None and out < self.minimum:
            raise bad
        if self.maximum is not None and out > self.maximum:
            raise bad
        return out

    def _describe(self) -> str:
        text = _SCALARS[self.kind]
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        if self.minimum is not None and self.maximum is not None:
            article = "an" if text == "integer" else "a"
            return f"{article} {text} in [{self.minimum:g}, {self.maximum:g}]"
        if self.minimum is not None:
            return f"a {text} >= {self.minimum:g}"
        return f"a {text}"

    def json_schema(self) -> dict[str, Any]:
        """This setting as a JSON-schema fragment (used by the OpenAPI document and the docs)."""
        schema: dict[str, Any] = {"type": _SCALARS[self.kind], "description": self.description}
        if self.default is not None:
            schema["default"] = self.default
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.choices:
            schema["enum"] = list(self.choices)
        return schema


@dataclass
class ProcessContext:
    """What a preprocessor may need besides its image and settings.

    ``seed`` is the default seed for randomised preprocessors: derived from the
    task (its UUID, else the input bytes) so that a retry of the same task gives
    the same picture bit for bit.
    """

    seed: int
    models: ModelStore | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def seed_setting(what: str) -> Setting:
    """The ``seed`` setting of a randomised preprocessor (``what`` names what it seeds)."""
    return Setting(
        "seed",
        int,
        None,
        f"Seed of {what} (numpy PCG64). Default: derived from the task UUID (else the "
        "input bytes), so a retried task gives the same image.",
        minimum=0,
        maximum=2**32 - 1,
    )


def resolve_seed(params: Mapping[str, Any], ctx: ProcessContext) -> int:
    """The explicit ``seed`` setting, else the task-derived one; recorded in ``ctx.meta``."""
    seed = ctx.seed if params.get("seed") is None else int(params["seed"])
    ctx.meta["seed"] = seed
    return seed


def derive_seed(*parts: str | bytes | None) -> int:
    """A stable 32-bit seed from the task's identity (task UUID and/or input bytes)."""
    h = hashlib.sha256()
    for part in parts:
        if part is None:
            continue
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\x00")
    return int.from_bytes(h.digest()[:4], "big")


class Preprocessor(ABC):
    """Base class of one ControlNet preprocessor.

    Subclasses set the class attributes and implement :meth:`process`. The image
    handed to ``process`` is already decoded to 8-bit RGB (``H×W×3`` uint8) and
    already at the output size; ``process`` returns a guide image of the same
    height and width, ``H×W×3`` uint8.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    #: Settings besides ``variant``; the engine adds width/height/output ones itself.
    settings: ClassVar[tuple[Setting, ...]] = ()
    #: Variants, first one is the default (the one matching Runware / ControlNet 1.1).
    variants: ClassVar[tuple[str, ...]] = ("default",)
    #: Price class for cost estimates: "canny" (light) or "depth" (model-based).
    price_class: ClassVar[str] = "canny"

    def models(self, variant: str) -> tuple[ModelSpec, ...]:
        """The model weights ``variant`` needs (empty for classical preprocessors)."""
        return ()

    @property
    def default_variant(self) -> str:
        return self.variants[0]

    def all_settings(self) -> tuple[Setting, ...]:
        variant = Setting(
            "variant",
            str,
            self.default_variant,
            f"Which {self.name} method to run.",
            choices=self.variants,
        )
        return (variant, *self.settings)

    def validate(self, raw: Mapping[str, Any] | None) -> dict[str, Any]:
        """Validated settings with defaults filled in.

        Unknown keys, wrong types and out-of-range values raise
        ``invalidParameter`` naming the setting; ``None`` values mean "default".
        """
        by_name: dict[str, Setting] = {}
        for s in self.all_settings():
            by_name[s.name] = s
            for alias in s.aliases:
                by_name[alias] = s
        values: dict[str, Any] = {}
        for key, value in (raw or {}).items():
            setting = by_name.get(key)
            if setting is None:
                accepted = ", ".join(s.name for s in self.all_settings())
                raise InvalidParameter(
                    f"'{key}' does not apply to the {self.name} preprocessor; "
                    f"it accepts: {accepted}",
                    parameter=key,
                )
            if value is None:
                continue
            if setting.name in values:
                raise InvalidParameter(
                    f"'{setting.name}' was given twice (as '{key}' and another spelling)",
                    parameter=key,
                )
            values[setting.name] = setting.coerce(value, owner=self.name)
        for s in self.all_settings():
            values.setdefault(s.name, s.default)
        self.check(values)
        return values

    def check(self, values: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Cross-setting rules (for example canny's low < high); raise ``InvalidParameter``."""

    @abstractmethod
    def process(
        self, image: np.ndarray, params: Mapping[str, Any], ctx: ProcessContext
    ) -> np.ndarray:
        """Make the guide image: ``H×W×3`` uint8 RGB in, ``H×W×3`` uint8 out, same size."""

    def process_batch(
        self,
        images: Sequence[np.ndarray],
        params: Mapping[str, Any],
        ctxs: Sequence[ProcessContext],
    ) -> list[np.ndarray]:
        """Several images with the same settings, each with its own context (seed, meta).

        The default runs :meth:`process` image by image; model-based preprocessors
        override it to share forward passes (see :class:`BatchedPreprocessor`). The
        contexts share one model store.
        """
        return [self.process(img, params, ctx) for img, ctx in zip(images, ctxs, strict=True)]

    def batches(self, params: Mapping[str, Any]) -> bool:
        """Whether :meth:`process_batch` shares forward passes between images for ``params``.

        Callers group same-settings images only when it does: a ``process_batch`` that
        loops would merely serialise, on one worker thread, work that could run in parallel.
        """
        return False

    def describe(self) -> dict[str, Any]:
        """A JSON-able description: settings, variants, models (for ``--help`` and docs)."""
        return {
            "name": self.name,
            "summary": self.summary,
            "variants": list(self.variants),
            "settings": {s.name: s.json_schema() for s in self.all_settings()},
            "models": {v: [m.name for m in self.models(v)] for v in self.variants},
        }


class BatchedPreprocessor(Preprocessor):
    """A preprocessor that implements :meth:`process_batch`; ``process`` is its batch of one.

    One code path for one image or many, so a batched result can only differ from a
    single one by what the network itself does with a batch.
    """

    def batches(self, params: Mapping[str, Any]) -> bool:
        return True

    def process(
        self, image: np.ndarray, params: Mapping[str, Any], ctx: ProcessContext
    ) -> np.ndarray:
        return self.process_batch([image], params, [ctx])[0]

    @abstractmethod
    def process_batch(
        self,
        images: Sequence[np.ndarray],
        params: Mapping[str, Any],
        ctxs: Sequence[ProcessContext],
    ) -> list[np.ndarray]:
        """One guide image per input image, in order (see :meth:`Preprocessor.process_batch`)."""


P = TypeVar("P", bound=type[Preprocessor])
_REGISTRY: dict[str, Preprocessor] = {}


def register(cls: P) -> P:
    """Class decorator: add one preprocessor (a single instance is shared; keep it stateless)."""
    if cls.name not in PREPROCESSOR_NAMES:
        raise ValueError(f"{cls.name!r} is not one of the 12 Runware preprocessors")
    _REGISTRY[cls.name] = cls()
    return cls


def canonical_name(name: str) -> str:
    """Canonical name: ``'runware:controlnet-preprocess@lineart-anime'`` → ``'lineart_anime'``.

    Raises ``invalidPreProcessorType`` when the name is not one of the 12.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidPreProcessorType(
            "preProcessorType is required: one of " + ", ".join(PREPROCESSOR_NAMES),
            parameter="preProcessorType",
        )
    raw = name.strip()
    parameter = "preProcessorType"
    if raw.lower().startswith(MODEL_ID_PREFIX):
        raw = raw[len(MODEL_ID_PREFIX) :]
        parameter = "model"
    key = raw.lower().replace("-", "_")
    if key not in PREPROCESSOR_NAMES:
        raise InvalidPreProcessorType(
            f"unknown preprocessor {name!r}; expected one of {', '.join(PREPROCESSOR_NAMES)}"
            f" (or the model id {MODEL_ID_PREFIX}<name>)",
            parameter=parameter,
        )
    return key


def model_id(name: str) -> str:
    """The new request form's model id for a preprocessor (it writes ``lineart-anime``)."""
    return MODEL_ID_PREFIX + canonical_name(name).replace("_", "-")


def get(name: str) -> Preprocessor:
    """The registered preprocessor for ``name`` in either request form."""
    _load_all()
    key = canonical_name(name)
    try:
        return _REGISTRY[key]
    except KeyError:  # pragma: no cover - every name is registered once the package loads
        raise InvalidPreProcessorType(
            f"preprocessor {key!r} is not available in this build", parameter="preProcessorType"
        ) from None


def available() -> dict[str, Preprocessor]:
    """All registered preprocessors by canonical name."""
    _load_all()
    return dict(_REGISTRY)


def _load_all() -> None:
    # Importing the package runs every module's @register.
    import engine.preprocessors  # noqa: F401
