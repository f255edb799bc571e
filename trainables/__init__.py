"""The training methods of catrs, one module each, each registered where it is defined.

`trainables.get(name)` returns a `Method` (see `base.py`); `trainables.names()` lists them. To add a
method, write one module that registers it (`METHOD = METHODS.add(Method(...))`): the registry finds every
module of this package by itself.
"""

from __future__ import annotations

from trainables.base import METHODS, Batch, Method, SoftLabelNeed, StepContext, StepOutput

__all__ = ["Batch", "Method", "SoftLabelNeed", "StepContext", "StepOutput", "get", "names"]


def names() -> list[str]:
    return METHODS.names()


def get(name: str) -> Method:
    """The method `name`; an unknown name is a `catrs.errors.UserError` listing the valid ones."""
    return METHODS.get(name)
