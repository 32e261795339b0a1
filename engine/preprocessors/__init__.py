"""One module per preprocessor; importing this package registers all of them.

Each module defines one :class:`engine.registry.Preprocessor` subclass decorated
with :func:`engine.registry.register`. Modules whose names start with ``_`` hold
shared helpers and register nothing.
"""

import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
