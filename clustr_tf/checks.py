"""Argument checks shared by the library: each raises `ValueError` naming the argument and
what was received, the way every error of this library reads."""

import numbers


def positive_int(name, value):
    """Returns `value` if it is an integer >= 1 (bools are not), else raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. Received: {value!r}")
    return value


def integer(name, value):
    """Returns `value` if it is an integer (bools are not), else raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an integer. Received: {value!r}")
    return value


def one_of(name, value, choices):
    """Returns `value` if it is one of `choices`, else raises ValueError listing them."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(str, choices))}. Received: {value!r}")
    return value


def non_negative(name, value):
    """Returns `value` if it is a number >= 0 (not NaN), else raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"`{name}` must be >= 0. Received: {value!r}")
    return value
