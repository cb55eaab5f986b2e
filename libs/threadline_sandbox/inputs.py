"""How input files are named in a sandbox's /mnt/data: shared by the tool executor (which copies them) and the run
orchestrator (which tells the model their paths), so both always agree."""

from collections.abc import Iterable, Mapping, Sequence

DATA_DIR = "/mnt/data"
"""Where the code finds its input files (its working directory)."""


def within_budget(file_ids: Sequence[str], sizes: Mapping[str, int], max_total_bytes: int) -> list[str]:
    """Those of `file_ids` (in order) that go into a sandbox: known (`sizes`: bytes by id), while their total fits in
    `max_total_bytes` (a file that does not fit is left out; a later, smaller one may still go in)."""
    chosen: list[str] = []
    total = 0
    for file_id in file_ids:
        if file_id in sizes and total + sizes[file_id] <= max_total_bytes:
            chosen.append(file_id)
            total += sizes[file_id]
    return chosen


def input_names(files: Sequence[tuple[str, str]]) -> list[str]:
    """The name the tool executor hands each (file id, filename) to the sandbox under: its filename, or
    `<file id>_<filename>` when an earlier file has that name (a later file of the same name then replaces it)."""
    names: list[str] = []
    for file_id, filename in files:
        names.append(filename if filename not in names else f"{file_id}_{filename}")
    return names


def sandbox_names(names: Iterable[str]) -> list[str]:
    """Each input name (without repeats, in order) reduced to the unique, harmless basename it gets in the data dir."""
    result: list[str] = []
    for raw in names:
        base = raw.replace("\\", "/").rsplit("/", 1)[-1].strip().lstrip(".") or "file"
        base = "".join(c if c.isprintable() and c not in "\0" else "_" for c in base)[:200]
        name, counter = base, 1
        while name in result:
            stem, dot, ext = base.rpartition(".")
            name = f"{stem}_{counter}.{ext}" if dot and stem else f"{base}_{counter}"
            counter += 1
        result.append(name)
    return result


def input_paths(files: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(file id, `/mnt/data/<name>`) of each input file the code sees, for (file id, filename) in the order the tool
    executor copies them (`input_names`, then `Sandbox.run_python`'s `sandbox_names`)."""
    by_name = dict(zip(input_names(files), (file_id for file_id, _ in files), strict=True))
    return [(file_id, f"{DATA_DIR}/{name}") for name, file_id in zip(sandbox_names(by_name), by_name.values(),
                                                                     strict=True)]
