"""The guideflow engine: the 12 ControlNet preprocessors, offline, in-process.

``from engine import Engine`` is the entry point; submodules load lazily so that
importing ``engine.models`` or ``engine.registry`` stays cheap.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.api import Engine, GuideImage

__all__ = ["Engine", "GuideImage"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from engine import api

        return getattr(api, name)
    raise AttributeError(name)
