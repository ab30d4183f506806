"""Run a program written for Modal by changing only its import line.

```python
from cloudmodal.compat import modal  # instead of `import modal`
from modal.exception import NotFoundError  # resolves to cloudmodal.exception

app = modal.App("example")
```

Importing this module makes ``modal`` an alias of the ``cloudmodal`` package in this process, and
``modal.<name>`` an alias of ``cloudmodal.<name>`` for each module cloudmodal has under Modal's name (``app``,
``cls``, ``exception``, ``functions``, ``image``, ``output``, ``partial_function``, ``retries``, ``runner``,
``schedule``, ``secret``, ``volume``, ``dict``, ``queue``, ``cloud_bucket_mount``…): ``import modal.exception`` and
``from modal.functions import FunctionCall`` then give cloudmodal's objects. The alias is installed once, by a
finder at the front of ``sys.meta_path``, so it also holds in workers, which import the program as it is.

The compat line must come before the ``from modal.… import`` lines; an import sorter (isort, ruff's ``I``
rules) would put it after them, as ``cloudmodal`` sorts as first-party: mark the block (``# isort: skip``).

What it cannot do: make names exist that cloudmodal lacks (``modal.Sandbox`` while it is not built, an
exception class Modal has and cloudmodal does not), nor share a process with the real ``modal`` package —
importing this module after ``modal`` itself was imported is an error. A module Modal has and cloudmodal does
not (``modal.billing``…) raises ``ModuleNotFoundError`` saying so.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

import cloudmodal

__all__ = ["modal", "install"]

ALIAS = "modal"

modal = cloudmodal  # `from cloudmodal.compat import modal`


def _real_name(alias: str) -> str:
    return "cloudmodal" + alias[len(ALIAS) :]


class _ModalAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``modal`` and ``modal.<x>`` and loads them as the already-importable ``cloudmodal[.<x>]``
    module object itself (not a copy: ``modal.App is cloudmodal.App``)."""

    def __init__(self) -> None:
        self._specs: dict[str, Any] = {}  # alias -> the real module's own __spec__, restored after loading

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != ALIAS and not fullname.startswith(ALIAS + "."):
            return None
        real = _real_name(fullname)
        try:
            found = importlib.util.find_spec(real)
        except ModuleNotFoundError:
            found = None
        if found is None:
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: cloudmodal has no {real!r} module. cloudmodal.compat aliases "
                f"only the modules cloudmodal has; see `python -c 'import cloudmodal; help(cloudmodal)'`.",
                name=fullname,
            )
        return importlib.util.spec_from_loader(
            fullname, self, is_package=found.submodule_search_locations is not None
        )

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(_real_name(spec.name))
        self._specs[spec.name] = module.__spec__  # the import system overwrites __spec__ next
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The module ran when it was imported under its own name; only give it back its own spec.
        module.__spec__ = self._specs.pop(module.__spec__.name if module.__spec__ else "", module.__spec__)


def install() -> None:
    """Alias ``modal`` to ``cloudmodal`` in this process (importing :mod:`cloudmodal.compat` does it)."""
    existing = sys.modules.get(ALIAS)
    if existing is not None and existing is not cloudmodal:
        raise ImportError(
            "The real `modal` package is already imported in this process, so cloudmodal.compat cannot alias "
            "`modal` to cloudmodal. Import cloudmodal.compat first, or use `import cloudmodal as modal`."
        )
    if not any(isinstance(f, _ModalAlias) for f in sys.meta_path):
        sys.meta_path.insert(0, _ModalAlias())


install()
