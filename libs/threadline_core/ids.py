"""Time-ordered, prefixed object ids, so that sorting by id is sorting by creation."""

import secrets
import time

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def _encode(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, digit = divmod(number, 36)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def new_id(prefix: str) -> str:
    """Return `prefix_` + 24 chars: 13 of 100 ns timestamp then 11 random, lexically time-ordered."""
    stamp = _encode(time.time_ns() // 100, 13)
    noise = _encode(secrets.randbits(56), 11)
    return f"{prefix}_{stamp}{noise}"


def now_seconds() -> int:
    """Unix time in whole seconds, the unit of every `*_at` field of the API."""
    return int(time.time())
