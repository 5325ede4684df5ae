"""CPU-trivial tasks (default queue)."""

from __future__ import annotations

import math

from celery import shared_task


def check_number(name: str, value: object) -> int | float:
    """Numbers only: bool (an int subclass) and non-finite floats are rejected."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"add: {name} must be a number, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise TypeError(f"add: {name} must be a finite number, got {value!r}")
    return value


@shared_task(name="fleetapp.add", throws=(TypeError,))
def add(a: int | float, b: int | float) -> int | float:
    """The tutorial's second task: a + b, with the inputs checked."""
    return check_number("a", a) + check_number("b", b)
