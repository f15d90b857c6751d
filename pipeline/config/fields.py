"""Declarative field specs for config dataclasses.

Every config section is a plain ``@dataclass`` whose fields are made with :func:`spec`, which
stores the validation rules (bounds, choices) and a one-line help text in the field's metadata.
The loader (:mod:`pipeline.config.loader`) reads the type hints and these rules to validate
user input generically, so a section module only declares what it needs::

    @dataclass
    class OptimConfig:
        lr: float = spec(3e-4, gt=0, help="peak learning rate")
        name: Literal["adamw", "lion", "sgd"] = spec("adamw", help="optimizer")
"""

from __future__ import annotations

import dataclasses
from typing import Any


def spec(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    help: str = "",
) -> Any:
    """A dataclass field with validation metadata.

    ``ge``/``gt``/``le``/``lt`` bound numbers (and every item of a list of numbers). Choices
    come from ``Literal[...]`` type hints, so they are not repeated here.
    """
    metadata = {"ge": ge, "gt": gt, "le": le, "lt": lt, "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
