"""Error messages that quote user input stay short, whatever the input."""
from __future__ import annotations

import math

MAX_SHOWN = 60   # characters of a user's value an error message repeats


def shown(v) -> str:
    """``repr(v)``, cut to about ``MAX_SHOWN`` characters (error messages stay short whatever
    the input)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10 ** MAX_SHOWN:
        return f"an integer of about {int(v.bit_length() * math.log10(2)) + 1} digits"
    try:
        text = repr(v)
    except (ValueError, RecursionError):   # str() of an int of over 4300 digits; deep nesting
        return f"a {type(v).__name__} too long or too deep to show"
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN - 15]}... ({len(text)} chars)"
