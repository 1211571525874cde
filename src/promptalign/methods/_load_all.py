"""Imports every method module so that each registers itself. New method files are found
automatically: this module lists none of them (the registries do the same on first use)."""

from ..registry import import_package

import_package(__package__)
