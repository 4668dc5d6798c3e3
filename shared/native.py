"""Pickling of the frozen dataclasses that mypyc compiles (scripts/build_native.py, issue 16 item 5).

A compiled class unpickles by assigning each attribute through setattr, which a frozen dataclass refuses; these
classes pickle through `reduce_frozen` instead: their fields, set back with object.__setattr__ as the
dataclass's own __init__ does. The same pickle loads whether the module runs compiled or interpreted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["reduce_frozen"]


def reduce_frozen(obj: Any) -> tuple[Any, tuple[Any, ...]]:
    """`__reduce__` of a frozen dataclass instance: its class and its fields' values, by name."""
    return _rebuild, (type(obj), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})


def _rebuild(cls: Any, values: dict[str, Any]) -> Any:
    # cls.__new__, not object.__new__ (which refuses a compiled class); serializable: it runs no __init__.
    obj = cls.__new__(cls)
    for name, value in values.items():
        object.__setattr__(obj, name, value)
    return obj
