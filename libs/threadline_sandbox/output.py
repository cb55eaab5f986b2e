"""Output past a limit, as a notebook shows it: the start and the end kept, a marker saying how much was left out.

Used by the sandbox (`runner`: each stream's bytes, against `SandboxLimits.output_bytes`) and by the tool executor
(the logs the model reads, against its own character limit), so both cut the same way and one marker counts all."""

import re
from collections.abc import Callable

TAIL_SHARE = 5
"""The end of a cut text keeps 1/TAIL_SHARE of what is kept (its last lines: a result, a traceback), the start the
rest."""

_MARKER = re.compile(r"\[\.\.\. output truncated: ([\d,]+) bytes \(([\d,]+) lines?\) left out \.\.\.\]\n")


def marker(left_bytes: int, left_lines: int) -> str:
    """The line standing for what was left out (its bytes, and the lines they held)."""
    return f"[... output truncated: {left_bytes:,} bytes ({left_lines:,} line{'' if left_lines == 1 else 's'}) " \
           "left out ...]\n"


def _whole_chars_head(data: bytes) -> bytes:
    """`data` without a UTF-8 sequence cut at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return data
        if byte >= 0xC0:
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= needed else data[:-back]
    return data


def _whole_chars_tail(data: bytes) -> bytes:
    """`data` without the continuation bytes of a UTF-8 sequence cut at its start."""
    start = 0
    while start < min(3, len(data)) and 0x80 <= data[start] < 0xC0:
        start += 1
    return data[start:]


def cut_points(size: int, budget: int, newline_before: Callable[[int], int],
               newline_after: Callable[[int], int]) -> tuple[int, int]:
    """Where a text of `size` units cut to `budget` units ends its start and begins its end: at line boundaries when
    one is near (within half of each part), else exactly. `newline_before(i)`: index of the last newline before i
    (-1: none); `newline_after(i)`: index of the first newline at or after i (-1: none)."""
    tail = budget // TAIL_SHARE
    head = budget - tail
    head_end = newline_before(head) + 1
    if head_end < head // 2 or head_end == 0:
        head_end = head
    tail_start = size - tail
    if tail:
        found = newline_after(tail_start - 1)
        if found != -1 and found + 1 - tail_start <= tail // 2:
            tail_start = found + 1
    return head_end, max(tail_start, head_end)


def clip_bytes(head: bytes, tail: bytes, total: int, total_lines: int, budget: int) -> tuple[bytes, bytes, int, int]:
    """A stream of `total` bytes (`total_lines` newlines) cut to `budget` bytes: its start and its end kept, and the
    bytes and lines left out between them. `head`: its first bytes (at least `budget` of them, or all it holds);
    `tail`: the bytes after them (its last ones, at least `budget` of them unless `head + tail` is all of it)."""
    if total <= budget:
        return head + tail, b"", 0, 0
    tail_size = budget // TAIL_SHARE
    # the last bytes, one more than the end keeps (whether the end starts a line); `offset`: where they start
    ends = (head + tail if len(head) + len(tail) == total else tail)[-(tail_size + 1):]
    offset = total - len(ends)

    def newline_before(index: int) -> int:
        return head.rfind(b"\n", 0, min(index, len(head)))

    def newline_after(index: int) -> int:
        found = ends.find(b"\n", max(index - offset, 0))
        return found + offset if found != -1 else -1

    head_end, tail_start = cut_points(total, budget, newline_before, newline_after)
    kept_head = _whole_chars_head(head[:head_end])
    kept_tail = _whole_chars_tail(ends[tail_start - offset:]) if tail_size else b""
    left = total - len(kept_head) - len(kept_tail)
    lines = total_lines - kept_head.count(b"\n") - kept_tail.count(b"\n")
    return kept_head, kept_tail, left, lines


def join(head: str, left_bytes: int, left_lines: int, tail: str) -> str:
    """The kept start, the marker (on a line of its own) and the kept end."""
    if not left_bytes:
        return head + tail
    return head + ("" if not head or head.endswith("\n") else "\n") + marker(left_bytes, left_lines) + tail


def clip_text(text: str, max_chars: int) -> str:
    """`text` cut to about `max_chars` characters: its start and its end, and one marker counting what was left out,
    what an earlier cut's marker there counted included (so the reader is told all that is missing)."""
    if len(text) <= max_chars:
        return text
    head_end, tail_start = cut_points(len(text), max_chars, lambda i: text.rfind("\n", 0, i),
                                      lambda i: text.find("\n", max(i, 0)))
    for found in _MARKER.finditer(text):  # a marker cut in two is left out whole
        if found.start() < head_end < found.end():
            head_end = found.start()
        if found.start() < tail_start < found.end():
            tail_start = found.end()
    left_out = text[head_end:tail_start]
    left_bytes = left_lines = 0
    for found in _MARKER.finditer(left_out):
        left_bytes += int(found.group(1).replace(",", ""))
        left_lines += int(found.group(2).replace(",", ""))
    rest = _MARKER.sub("", left_out)
    left_bytes += len(rest.encode("utf-8", "surrogatepass"))
    left_lines += rest.count("\n")
    return join(text[:head_end], left_bytes, left_lines, text[tail_start:])
