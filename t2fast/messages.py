"""Error messages that quote user input stay short, whatever the input."""
from __future__ import annotations

import math

MAX_SHOWN = 60            # characters of a user's value an error message repeats ...
MAX_MESSAGE_CHARS = 300   # ... and the most any message that quotes one may hold


def cap_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    tail = f"... ({len(text) - limit} more characters)"
    return text[:max(limit - len(tail), 0)] + tail


def shown(v) -> str:
    """``repr(v)``, cut to about ``MAX_SHOWN`` characters, so error messages stay short whatever
    the input: a huge integer is described by its digits, a container by its length (never
    walked: deep nesting cannot overflow the stack)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10 ** MAX_SHOWN:
        return f"an integer of about {int(v.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(v, (dict, list, tuple)):
        text = repr(v) if len(v) <= 8 and _flat(v) else f"{type(v).__name__} of {len(v)} item(s)"
    else:
        text = repr(v)
    return cap_text(text, MAX_SHOWN)


def _flat(container) -> bool:
    values = container.values() if isinstance(container, dict) else container
    return not any(isinstance(x, (dict, list, tuple)) for x in values)


def shown_list(values, limit: int = 3) -> str:
    """The first ``limit`` of ``values`` (each :func:`shown`) and how many more there are."""
    values = list(values)
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return ", ".join(shown(v) for v in values[:limit]) + more
