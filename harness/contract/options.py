"""A command-line option is declared once: a dataclass field whose metadata holds its help, its words
and its range. argparse is built from the fields (gate/options.py), the ranges are checked from them
before any job (check_ranges), and README's option table is tested against the parser they make.

    lr: float = option(1e-4, "peak learning rate (AdamW)", positive=True, maximum=1.0)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from harness.contract.errors import UsageError

TRI_STATE = {"auto": None, "on": True, "off": False}  # None: the plan decides


@dataclass(frozen=True)
class Option:
    help: str
    group: str = "training"  # where --help lists it: run | training | gate
    words: dict[str, Any] | None = None  # the values a user types -> the field's values (choices)
    bare: str | None = None  # the word a flag given alone means (--compile: pointwise)
    switch: Any = None  # a flag without a value sets this (--no-packing: False)
    flag: str | None = None  # another spelling than --field-name
    minimum: float | None = None
    positive: bool = False
    maximum: float | None = None  # above it the value is a typo (an lr of 3 for 3e-4)
    repeat: bool = False  # given once per value (--stack a --stack b): the field is a tuple

    def check(self, flag: str, value: Any) -> None:
        """One line naming the value and the range, for a value out of it (UsageError)."""
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if self.minimum is not None and value < self.minimum:
            raise UsageError(f"{flag} must be at least {self.minimum:g}, got {value}")
        if self.positive and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} must be a positive number, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise UsageError(f"{flag} {value} is above {self.maximum}: did you mean {value:g}e-4 or similar?")


def typed_as_is(values: tuple[str, ...]) -> dict[str, str]:
    """Option words that are the values themselves."""
    return {value: value for value in values}


def option(default: Any, help: str, **declared: Any) -> Any:
    """A dataclass field that is also a command-line option."""
    return dataclasses.field(default=default, metadata={"option": Option(help, **declared)})


def options_of(cls) -> dict[str, Option]:
    """The fields of a dataclass that are options, in declaration order."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(cls) if "option" in f.metadata}


def flag_of(name: str, declared: Option) -> str:
    return declared.flag or "--" + name.replace("_", "-")


def from_words(declared: Option, value: Any) -> Any:
    """A typed or stored word as the field's value ('on' -> True); other values as they are."""
    if declared.words is not None and isinstance(value, str) and value in declared.words:
        return declared.words[value]
    return value


def check_ranges(cls, values: dict[str, Any]) -> None:
    """Every declared range of cls's options, on the values given (names of fields)."""
    for name, declared in options_of(cls).items():
        if name in values:
            declared.check(flag_of(name, declared), values[name])
