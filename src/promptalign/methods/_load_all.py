"""Imports every method module so that each registers itself. New method files are found
automatically: this module lists none of them."""

import importlib
import pkgutil

from . import __name__ as _pkg, __path__ as _path

for _info in pkgutil.iter_modules(_path):
    if not _info.name.startswith("_") and _info.name not in ("base", "prompts"):
        importlib.import_module(f"{_pkg}.{_info.name}")
