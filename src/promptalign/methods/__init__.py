"""Prompt-learning methods: one file per method, each registering itself.

``list_methods()`` / ``create_method(name, backbone, classnames, **config)`` are the entry points.
"""

from .base import (
    MethodConfig,
    MethodOutput,
    PromptMethod,
    Regularizer,
    create_method,
    list_methods,
)

__all__ = [
    "MethodConfig",
    "MethodOutput",
    "PromptMethod",
    "Regularizer",
    "create_method",
    "list_methods",
]
