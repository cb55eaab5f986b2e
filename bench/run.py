"""Run the benchmarks: every `bench/bench_*.py` in turn, or those named on the command line.

Usage: ``python bench/run.py [NAME ...] [-- ARGS ...]`` where NAME is ``runs`` / ``bench_runs`` /
``bench/bench_runs.py``; ARGS after ``--`` are passed to every bench (e.g. ``-- --quick``). Each
bench runs in its own process (its own stack), prints its tables and writes
``bench/results/<name>.md``. The exit code is non-zero if any bench failed.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def discover() -> dict[str, Path]:
    """name -> script for every bench/bench_*.py."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCH_DIR.glob("bench_*.py"))}


def select(names: list[str], available: dict[str, Path]) -> list[tuple[str, Path]]:
    """The benches asked for (all when none), in discovery order; unknown names are an error."""
    if not names:
        return list(available.items())
    chosen: list[tuple[str, Path]] = []
    for raw in names:
        name = Path(raw).stem.removeprefix("bench_")
        if name not in available:
            raise SystemExit(f"unknown bench {raw!r}; available: {', '.join(available) or 'none'}")
        chosen.append((name, available[name]))
    return chosen


def main(argv: list[str]) -> int:
    """Run the selected benches one after another; report a summary line each."""
    names, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    if any(n in ("-h", "--help") for n in names):
        print(__doc__)
        print("available:", ", ".join(discover()))
        return 0
    benches = select(names, discover())
    if not benches:
        print("no benches found in bench/")
        return 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    outcome: list[tuple[str, int, float]] = []
    for name, script in benches:
        print(f"\n===== bench {name} =====\n", flush=True)
        started = time.monotonic()
        try:
            code = subprocess.call([sys.executable, str(script), *extra], cwd=BENCH_DIR.parent, env=env)
        except KeyboardInterrupt:
            print(f"\nbench {name} interrupted", flush=True)
            return 130
        outcome.append((name, code, time.monotonic() - started))
    print("\n===== summary =====")
    for name, code, seconds in outcome:
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"{name:<12} {status:<18} {seconds:6.0f}s  bench/results/{name}.md")
    return 0 if all(code == 0 for _, code, _ in outcome) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
