"""file_search results as the model sees them, the `file_citation` and `file_path` annotations of the
answer, and the `include[]` rule of run steps. Pure functions: no ML, no I/O (the gateway and orchestrator
import them).

The model receives each result behind a marker `【{call}:{i}†source】` (the hosted API's source markers, which
code that strips `†source】` markers from answers relies on), then its file name; markers the answer repeats
become `file_citation` annotations over exactly that marker text.
Links to files the run's code_interpreter generated (`sandbox:/mnt/data/<name>`, or `/mnt/data/<name>` as
a markdown link target) become `file_path` annotations over exactly the link text.
"""

import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from threadline_search.search import SearchResult

_MARKER = re.compile(r"【(\d{1,9})(?::(\d{1,9}))?†([^】]*)】")
"""A source marker; indexes of 10 digits or more cite nothing (int() refuses over 4300 digits: the driver crashed)."""
_SANDBOX_LINK = re.compile(r"sandbox:(/mnt/data/[^\s()\[\]<>\"'`]+)")
_MARKDOWN_TARGET = re.compile(r"\]\((/mnt/data/[^\s()<>\"'`]+)\)")
_TRAILING = ".,;:!?"
_OPEN_MARKER = re.compile(r"【(?:\d+(?::\d*)?)?\Z|【\d+(?::\d+)?†[^】\n]{0,255}\Z")
"""The start of a source marker at the end of a streamed text, not closed yet."""


def marker(call_index: int, result_index: int) -> str:
    """The source marker of result `result_index` of the run's `call_index`-th file_search call."""
    return f"【{call_index}:{result_index}†source】"


def render_for_model(results: "Sequence[SearchResult]", call_index: int = 0) -> str:
    """The tool output the model reads: each chunk behind its marker (empty results say so)."""
    if not results:
        return "No results found in the attached files."
    return "\n\n".join(f"{marker(call_index, i)} {r.filename}: {r.text}" for i, r in enumerate(results))


def step_results(results: "Sequence[SearchResult]") -> list[dict[str, Any]]:
    """`file_search.results` of the run step, content included (the gateway strips it unless asked)."""
    return [r.to_step_result(include_content=True) for r in results]


def citation_annotations(text: str, calls: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """`file_citation` annotations for the markers in `text`.

    `calls[c]` are the `file_search.results` of the run's c-th file_search call (dicts with `file_id` and
    `file_name`, as in the run step). A marker `【c:i†name】` cites calls[c][i]; a marker `【i†name】` cites
    result i of the last call; failing that, the file is found by its name.
    """
    annotations: list[dict[str, Any]] = []
    for match in _MARKER.finditer(text):
        first, second, name = match.group(1), match.group(2), match.group(3)
        call_idx, result_idx = (int(first), int(second)) if second is not None else (len(calls) - 1, int(first))
        file_id: str | None = None
        if 0 <= call_idx < len(calls) and 0 <= result_idx < len(calls[call_idx]):
            file_id = str(calls[call_idx][result_idx].get("file_id") or "") or None
        if file_id is None:
            file_id = next((str(r.get("file_id")) for call in calls for r in call
                            if r.get("file_name") == name and r.get("file_id")), None)
        if file_id is None:
            continue
        annotations.append({"type": "file_citation", "text": match.group(0), "start_index": match.start(),
                            "end_index": match.end(), "file_citation": {"file_id": file_id}})
    return annotations


def file_search_calls(steps: Iterable[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """The `file_search.results` of each file_search call of a run, in order (steps in creation order)."""
    calls: list[list[Mapping[str, Any]]] = []
    for step in steps:
        details = step.get("step_details") or {}
        if details.get("type") != "tool_calls":
            continue
        for call in details.get("tool_calls") or []:
            if isinstance(call, Mapping) and call.get("type") == "file_search":
                calls.append(list((call.get("file_search") or {}).get("results") or []))
    return calls


def _generated_file(path: str, files: Mapping[str, str]) -> tuple[str, str] | None:
    """(path as linked, file id) of the generated file `path` links to; trailing sentence punctuation and
    %-escapes are tolerated."""
    while path:
        for candidate in (path, urllib.parse.unquote(path)):
            if candidate in files:
                return path, files[candidate]
        if path[-1] not in _TRAILING:
            return None
        path = path[:-1]
    return None


def file_path_annotations(text: str, files: Mapping[str, str]) -> list[dict[str, Any]]:
    """`file_path` annotations for the links in `text` to generated files (`files`: path as the code saw it,
    `/mnt/data/<name>` -> file id): over `sandbox:/mnt/data/<name>`, or over `/mnt/data/<name>` when that is
    a markdown link target."""
    if not files:
        return []
    annotations: list[dict[str, Any]] = []
    for pattern, prefix in ((_SANDBOX_LINK, "sandbox:"), (_MARKDOWN_TARGET, "")):
        for match in pattern.finditer(text):
            found = _generated_file(match.group(1), files)
            if found is None:
                continue
            start = match.start(1) - len(prefix)
            linked = prefix + found[0]
            annotations.append({"type": "file_path", "text": linked, "start_index": start,
                                "end_index": start + len(linked), "file_path": {"file_id": found[1]}})
    return annotations


def annotate_content(content: list[dict[str, Any]], steps: Iterable[Mapping[str, Any]],
                     generated: Mapping[str, str] | None = None) -> None:
    """Set the annotations of a message's text parts: `file_citation` from the run's file_search steps,
    `file_path` for links to the run's `generated` files (path -> file id); in text order."""
    calls = file_search_calls(steps)
    if not calls and not generated:
        return
    for part in content:
        text = part.get("text") if part.get("type") == "text" else None
        if isinstance(text, dict) and isinstance(text.get("value"), str):
            found = citation_annotations(text["value"], calls) if calls else []
            found += file_path_annotations(text["value"], generated or {})
            text["annotations"] = sorted(found, key=lambda a: (a["start_index"], a["end_index"]))


def open_marker_length(text: str) -> int:
    """How many characters at the end of `text` are a source marker not closed yet: its delta waits for the
    rest, so the marker streams whole, with its annotation (as hosted)."""
    match = _OPEN_MARKER.search(text, max(0, len(text) - 300))
    return len(text) - match.start() if match else 0


def delta_annotations(text: str, sent: int, steps: Iterable[Mapping[str, Any]],
                      generated: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The annotations a text delta brings, as hosted streams them: those of the answer so far (`text`) that
    end after what earlier deltas held (`sent` characters), each with its `index` in the message's list."""
    content: list[dict[str, Any]] = [{"type": "text", "text": {"value": text}}]
    annotate_content(content, steps, generated)
    found = content[0]["text"].get("annotations") or []
    return [{"index": index, **annotation} for index, annotation in enumerate(found) if annotation["end_index"] > sent]
