"""Unit tests of the code-interpreter sandbox: results, files, and every limit tripping cleanly."""

import asyncio
import os
import re
import socket
import sys
from pathlib import Path

import pytest

from threadline_sandbox import Isolation, Sandbox, SandboxLimits, SandboxResult

pytestmark = pytest.mark.unit

FAST = SandboxLimits(cpu_seconds=1, wall_seconds=3, memory_bytes=512 << 20, output_bytes=20_000, max_processes=16)
ROOMY = SandboxLimits(cpu_seconds=10, wall_seconds=20, memory_bytes=1 << 30, output_bytes=20_000, max_processes=16)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sandbox-scratch")


@pytest.fixture(scope="module")
def sandbox(scratch: Path) -> Sandbox:
    return Sandbox(scratch_root=str(scratch), max_concurrency=4)


async def run(sandbox: Sandbox, code: str, files: dict[str, bytes] | None = None,
              limits: SandboxLimits = FAST) -> SandboxResult:
    return await sandbox.run_python(code, files or {}, limits)


async def test_solves_an_equation_and_shows_the_last_expression(sandbox: Sandbox) -> None:
    result = await run(sandbox, "x = (15 - 5) / 2\nprint(f'x = {x:g}')\n2 * x + 5")
    assert result.ok, result
    assert result.exit_code == 0
    assert result.stdout == "x = 5\n15.0\n"
    assert result.files == ()
    assert result.cpu_seconds is not None


async def test_exception_is_reported_with_a_traceback(sandbox: Sandbox) -> None:
    result = await run(sandbox, "def f():\n    return 1 / 0\nf()")
    assert result.error_kind == "exception"
    assert result.error == "ZeroDivisionError: division by zero"
    assert 'File "<code>", line 2, in f' in result.stderr
    assert "_supervisor" not in result.stderr  # the sandbox's own frames are not shown
    syntax = await run(sandbox, "def f(:\n  pass")
    assert syntax.error_kind == "exception" and syntax.error is not None
    assert syntax.error.startswith("SyntaxError")


async def test_input_files_are_readable_and_generated_files_collected(sandbox: Sandbox) -> None:
    code = ("import csv\nrows = list(csv.reader(open('data.csv')))\nprint(len(rows))\n"
            "open('result.txt', 'w').write('sum=' + str(sum(int(r[1]) for r in rows[1:])))\n"
            "with open('notes.md', 'a') as f:\n    f.write('more')\n")
    result = await run(sandbox, code, {"data.csv": b"a,b\n1,2\n3,4\n", "notes.md": b"# notes\n",
                                       "../../etc/evil name.txt": b"x"})
    assert result.ok, result
    assert result.stdout == "3\n"
    files = {f.name: f.data for f in result.files}
    assert files == {"result.txt": b"sum=6", "notes.md": b"# notes\nmore"}  # unchanged inputs are not outputs
    assert all(f.kind == "file" and not f.is_image for f in result.files)


async def test_generated_file_names_lose_their_control_characters(sandbox: Sandbox) -> None:
    """They name stored Files and are shown to users: a name carried terminal escapes, newlines or bidi controls."""
    names = ["red\x1b[31m.txt", "bell\x07\ttab.txt", "two\nlines.csv", "del\x7f c1\x9b.txt", "doc\u202etxt.exe",
             "sub\x01/inner.txt", "plain é 日本 👩\u200d💻.txt"]
    code = f"import os\nfor name in {names!r}:\n    os.makedirs(os.path.dirname(name) or '.', exist_ok=True)\n" \
           "    open(name, 'w').write('x')\n"
    result = await run(sandbox, code)
    assert result.ok, result
    assert sorted(f.name for f in result.files) == sorted([
        "red\ufffd[31m.txt", "bell\ufffd\ufffdtab.txt", "two\ufffdlines.csv", "del\ufffd c1\ufffd.txt",
        "doc\ufffdtxt.exe", "sub\ufffd/inner.txt", "plain é 日本 👩\u200d💻.txt"])


async def test_figures_and_png_files_are_images(sandbox: Sandbox) -> None:
    code = ("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.savefig('line.png')\n"
            "plt.figure()\nplt.bar([1, 2], [3, 4])\nplt.show()\n")
    result = await run(sandbox, code, limits=SandboxLimits(cpu_seconds=20, wall_seconds=30))
    assert result.ok, result
    kinds = sorted((f.kind, f.name, f.mime_type) for f in result.files)
    assert kinds == [("figure", "figure_001.png", "image/png"), ("file", "line.png", "image/png")]
    assert len(result.images) == 2


async def test_a_chart_saved_under_another_backend_comes_out_once(sandbox: Sandbox) -> None:
    """`matplotlib.use('Agg')` then `savefig` without `show()`: the saved file and the still-open figure made the
    chart twice (the sandbox's backend, which marks saved figures, was never loaded)."""
    code = ("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nplt.plot([1, 2])\n"
            "plt.savefig('chart.png')\nplt.figure()\nplt.bar([1, 2], [3, 4])\n")
    result = await run(sandbox, code, limits=SandboxLimits(cpu_seconds=20, wall_seconds=30))
    assert result.ok, result
    assert sorted((f.kind, f.name) for f in result.files) == [("figure", "figure_001.png"), ("file", "chart.png")]


async def test_display_works_as_in_a_notebook(sandbox: Sandbox) -> None:
    """Code written for hosted's notebook kernel calls `display(df)`: it failed with NameError. A value prints its
    repr; a figure becomes one image."""
    code = ("import pandas as pd\nimport matplotlib.pyplot as plt\n"
            "frame = pd.DataFrame({'x': [1, 2]})\ndisplay(frame)\ndisplay('done')\n"
            "figure, axes = plt.subplots()\naxes.plot([1, 2])\ndisplay(figure)\n")
    result = await run(sandbox, code, limits=SandboxLimits(cpu_seconds=20, wall_seconds=30))
    assert result.ok, result
    expected = "{!r}\n'done'\n".format(__import__("pandas").DataFrame({"x": [1, 2]}))
    assert result.stdout == expected
    assert [(f.kind, f.name) for f in result.files] == [("figure", "figure_001.png")]


async def test_ipython_display_imports_work(sandbox: Sandbox) -> None:
    """Notebook code imports `display` (and HTML, Markdown, Image) from IPython, which is not installed: the imports
    failed. They give the sandbox's own display: HTML and Markdown print their text, an Image of PNG bytes or of a
    file becomes an image output (once when the code also saved that file), `get_ipython()` is None (no shell runs)
    and the stand-in stays out of sys.modules, where libraries look for a running IPython."""
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    code = ("import sys\nfrom IPython.display import display, HTML, Markdown, Image, clear_output\n"
            "from IPython import get_ipython, display as notebook_display\nimport IPython.display\n"
            "from IPython.core.display import HTML as CoreHTML\n"
            "print(get_ipython(), IPython.get_ipython() is None, [m for m in sys.modules if m.startswith('IPython')])\n"
            "display(HTML('<h2>Results</h2><p>Accuracy: <b>93%</b> &amp; more</p><script>x()</script>'\n"
            "             '<table><tr><th></th><th>a</th></tr><tr><td>0</td><td>1</td></tr></table>'))\n"
            "display(Markdown('**bold** text'), 'plain')\nnotebook_display(CoreHTML('<i>module or function</i>'))\n"
            "IPython.display.display(3)\nclear_output()\n"
            f"open('saved.png', 'wb').write({png!r})\ndisplay(Image('saved.png'))\n"
            f"display(Image(data={png[:-1] + b'1'!r}))\ndisplay(Image(filename='input.png'))\n"
            "try:\n    import IPython.core.interactiveshell\nexcept ImportError as exc:\n    print(exc)\n"
            "HTML('<p>the last value</p>')")
    result = await run(sandbox, code, {"input.png": png[:-1] + b"2"})
    assert result.ok, result
    assert result.stdout == ("None True []\nResults\nAccuracy: 93% & more\n| a\n0 | 1\n**bold** text\n'plain'\n"
                             "module or function\n3\nNo module named 'IPython.core.interactiveshell'\n"
                             "the last value\n")
    shown = sorted((f.kind, f.data[-1:]) for f in result.files)
    assert shown == [("figure", b"1"), ("figure", b"2"), ("file", b"\x00")], result.files  # saved.png once
    assert all(f.mime_type == "image/png" for f in result.files)


MATPLOTLIB_AND_PANDAS = """import matplotlib.pyplot as plt
import pandas as pd
import sys
from pandas.io.formats import console
frame = pd.DataFrame({'x': range(80), 'y': [v * 0.5 for v in range(80)]})
print(frame)
plt.plot(frame.x, frame.y)
plt.show()
plt.figure()
plt.bar([1, 2], [3, 4])
plt.savefig('bar.png')
figure, axes = plt.subplots()
axes.plot([2, 1])
print(plt.get_backend(), plt._REPL_DISPLAYHOOK, console.in_ipython_frontend(), 'IPython' in sys.modules)
frame.describe()
"""


async def test_matplotlib_and_pandas_behave_the_same_with_ipython_imported(sandbox: Sandbox) -> None:
    """Importing IPython before or after matplotlib and pandas changes nothing they do: the same printed frames, the
    same figures (plt.show, savefig, a figure left open), byte for byte. (A stand-in IPython in sys.modules made
    them think they ran in IPython.)"""
    imports = "from IPython.display import display, HTML\nimport IPython\n"
    lines = MATPLOTLIB_AND_PANDAS.splitlines(keepends=True)
    variants = [MATPLOTLIB_AND_PANDAS, imports + MATPLOTLIB_AND_PANDAS,  # none, IPython before, IPython after
                "".join(lines[:4]) + imports + "".join(lines[4:])]
    results = await asyncio.gather(*(run(sandbox, code, limits=ROOMY) for code in variants))
    for result in results:
        assert result.ok, result
    plain = results[0]
    assert "\nmodule://_threadline_mpl_backend _ReplDisplayHook.PLAIN False False\n" in plain.stdout
    assert sorted((f.kind, f.name) for f in plain.files) == [("figure", "figure_001.png"), ("figure", "figure_002.png"),
                                                            ("file", "bar.png")]
    for result in results[1:]:
        assert result.stdout == plain.stdout
        assert [(f.kind, f.name, f.data) for f in result.files] == [(f.kind, f.name, f.data) for f in plain.files]


async def test_infinite_loop_hits_the_cpu_limit(sandbox: Sandbox) -> None:
    # a generous wall clock: on a busy machine one CPU second can take many seconds to accumulate
    result = await run(sandbox, "while True:\n    pass", limits=SandboxLimits(cpu_seconds=1, wall_seconds=120))
    assert result.error_kind == "cpu_limit", result
    assert result.error == "CPU time limit exceeded (1 seconds)"


async def test_sleeping_code_hits_the_wall_clock_limit(sandbox: Sandbox) -> None:
    result = await run(sandbox, "print('start')\nimport time\ntime.sleep(60)",
                       limits=SandboxLimits(wall_seconds=1.5))
    assert result.error_kind == "timeout", result
    assert result.error == "Execution timed out after 1.5 seconds"
    assert result.stdout == "start\n"
    assert "timed out" in result.logs


async def test_fork_bomb_hits_the_process_limit(sandbox: Sandbox) -> None:
    result = await run(sandbox, "import os\nwhile True:\n    os.fork()")
    assert result.error_kind in ("process_limit", "cpu_limit", "timeout"), result
    assert result.error is not None


async def test_thread_bomb_hits_the_process_limit(sandbox: Sandbox) -> None:
    code = ("import threading, time\n"
            "threads = [threading.Thread(target=time.sleep, args=(5,), daemon=True) for _ in range(200)]\n"
            "for t in threads:\n    t.start()\n")
    result = await run(sandbox, code)
    assert result.error_kind == "process_limit", result


async def test_huge_allocation_hits_the_memory_limit(sandbox: Sandbox) -> None:
    result = await run(sandbox, "block = bytearray(10 * 1024 ** 3)\nprint('allocated')")
    assert result.error_kind == "memory_limit", result
    assert result.error is not None and result.error.startswith("MemoryError")
    assert "allocated" not in result.stdout


async def test_no_network_even_to_loopback(sandbox: Sandbox) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        result = await run(sandbox, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                                    "print('connected')")
        assert result.error_kind == "exception", result
        assert result.error is not None and result.error.startswith(("OSError", "PermissionError"))
        assert "connected" not in result.stdout
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the listening server
    finally:
        server.close()


@pytest.mark.skipif(not os.path.isdir("/var/tmp"), reason="no /var/tmp on this host")
async def test_host_unix_sockets_and_writable_folders_are_hidden(sandbox: Sandbox) -> None:
    """The network namespace does not cover Unix sockets reached by path (a host Postgres in /run/postgresql
    trusting local users let the code run commands on the host), nor the host's writable /var/tmp and /run/lock
    (files that outlived the call, readable by later calls): the code sees empty folders there."""
    host_dir = Path("/var/tmp") / f"threadline-sandbox-test-{os.getpid()}"
    host_dir.mkdir(mode=0o777, exist_ok=True)
    host_dir.chmod(0o777)
    path = host_dir / "service.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o777)
    server.listen(1)
    server.setblocking(False)
    try:
        code = ("import os, socket\nprint(os.listdir('/var/tmp'), os.listdir('/run'))\n"
                "try:\n    open('/var/tmp/left-behind', 'w').write('x')\nexcept OSError:\n    pass\n"
                f"socket.socket(socket.AF_UNIX).connect({str(path)!r})\nprint('connected')")
        result = await run(sandbox, code)
        assert result.stdout.startswith("[] []"), result
        assert result.error_kind == "exception" and result.error is not None
        assert result.error.startswith(("FileNotFoundError", "PermissionError")), result.error
        assert "connected" not in result.stdout
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing reached the host's socket
        assert not await asyncio.to_thread(os.path.exists, "/var/tmp/left-behind")
    finally:
        server.close()
        path.unlink(missing_ok=True)
        host_dir.rmdir()
        await asyncio.to_thread(Path("/var/tmp/left-behind").unlink, missing_ok=True)


async def test_namespaces_mounts_and_vsock_are_refused_by_the_kernel(sandbox: Sandbox) -> None:
    """A seccomp filter: the code could create a user namespace (capabilities inside it: much more of the kernel to
    attack), and open vsock sockets (a hypervisor's channel to its host). What Python code needs still works."""
    code = """import ctypes, errno, os, socket, subprocess, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
for flag in (0x10000000, 0x20000, 0x40000000):  # CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET
    assert libc.unshare(flag) == -1 and ctypes.get_errno() == errno.EPERM, flag
assert libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == -1 and ctypes.get_errno() == errno.EPERM
try:
    socket.socket(40, socket.SOCK_STREAM)
except OSError as exc:
    assert exc.errno == errno.EAFNOSUPPORT
else:
    raise AssertionError("a vsock socket was created")
seen = []
worker = threading.Thread(target=seen.append, args=("thread",))
worker.start()
worker.join()
seen.append(subprocess.run([sys.executable, "-c", "print('child')"], capture_output=True, text=True).stdout.strip())
pid = os.fork()
if pid == 0:
    os._exit(7)
seen.append(os.waitpid(pid, 0)[1] >> 8)
print(seen)
"""
    result = await run(sandbox, code)
    assert result.ok, result
    assert result.stdout == "['thread', 'child', 7]\n"


async def test_session_cells_run_first_silently(sandbox: Sandbox) -> None:
    """A stateful session: the earlier cells' variables, functions and files are there; their output, figures and
    files are not reported again; a cell that raised still left what it did before raising."""
    cells = ["import os\nx = 41\nprint('shown once')\nopen('a.txt', 'w').write('hello')",
             "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()\ny = 1\n1 / 0\ny = 2",
             "def twice(v):\n    return 2 * v"]
    result = await sandbox.run_python("print(x + 1, y, twice(3), open('a.txt').read(), sorted(os.listdir('.')))\n"
                                      "size = open('b.txt', 'w').write('new')", {}, ROOMY, session=cells)
    assert result.ok, result
    assert result.stdout == "42 1 6 hello ['a.txt']\n" and result.stderr == ""
    assert [(f.kind, f.name) for f in result.files] == [("file", "b.txt")]
    fresh = await sandbox.run_python("print('x' in dir())", {}, FAST)
    assert fresh.stdout == "False\n"


async def test_the_libraries_hosted_code_uses_are_there(sandbox: Sandbox) -> None:
    """The quickstart's `3x + 11 = 14`, as a model writes it for code_interpreter (sympy), and the other
    libraries such code imports (`pd.read_excel` needs openpyxl)."""
    code = ("import networkx, nltk, openpyxl, pandas, pdfplumber, plotly, PyPDF2, reportlab, seaborn, sklearn, "
            "statsmodels, tabulate, xlrd\n"
            "from sympy import Eq, solve, symbols\nx = symbols('x')\nprint(solve(Eq(3 * x + 11, 14), x))")
    result = await run(sandbox, code, limits=SandboxLimits(cpu_seconds=60, wall_seconds=120))
    assert result.ok, result
    assert result.stdout == "[1]\n"


async def test_empty_files_stop_at_the_inode_cap(sandbox: Sandbox) -> None:
    """Empty files fill no tmpfs but cost kernel memory (400,000 of them pinned 450 MB): each private tmpfs has a
    file count cap."""
    code = ("made = 0\ntry:\n    for i in range(30000):\n        open(f'/tmp/f{i}', 'w').close()\n        made += 1\n"
            "except OSError as exc:\n    print('stopped', made, exc.errno)")
    result = await run(sandbox, code)
    words = result.stdout.split()
    assert words[:1] == ["stopped"] and int(words[1]) < 30000 and words[2] == "28", result  # ENOSPC


MARKER = re.compile(r"\[\.\.\. output truncated: ([\d,]+) bytes \(([\d,]+) lines?\) left out \.\.\.\]\n")


def left_out(text: str) -> list[tuple[int, int]]:
    """(bytes, lines) of each truncation marker in `text`."""
    return [(int(b.replace(",", "")), int(n.replace(",", ""))) for b, n in MARKER.findall(text)]


async def test_output_past_the_limit_is_truncated_and_the_cell_runs_to_its_end(sandbox: Sandbox) -> None:
    """A cell printing more than the output limit ran on to its end (it was stopped at the limit): its start and its
    end are kept, a marker says how much was left out between them, and what the cell did later happened."""
    code = ("import sys\nfor i in range(30000):\n    print(f'line {i:05d}')\nprint('careful', file=sys.stderr)\n"
            "total = 42\nopen('after.txt', 'w').write(str(total))\nprint('done', total)")
    result = await run(sandbox, code, limits=ROOMY)
    assert result.ok, result
    assert result.stderr == "careful\n"  # the small stream keeps all of it
    assert result.stdout.startswith("line 00000\nline 00001\n") and result.stdout.endswith("line 29999\ndone 42\n")
    ((dropped, dropped_lines),) = left_out(result.stdout)
    written = 30000 * len("line 00000\n") + len("done 42\n")
    kept = MARKER.sub("", result.stdout)
    assert len(kept) + dropped == written and kept.count("\n") + dropped_lines == 30001
    assert len(kept) + len(result.stderr) <= ROOMY.output_bytes
    assert len(kept) > 0.9 * ROOMY.output_bytes
    assert all(line.startswith(("line ", "done ")) for line in kept.splitlines())  # cut between lines
    assert result.output_truncated and result.output_left_out == dropped
    assert [(f.name, f.data) for f in result.files] == [("after.txt", b"42")]
    assert result.logs == result.stdout + result.stderr


async def test_a_big_dataframe_printed_and_then_a_traceback(sandbox: Sandbox) -> None:
    """The end of a flood is kept (the frame's last rows), and so is the traceback on stderr; a cut never splits a
    character (a line of 100 KB is cut within it)."""
    code = ("import pandas as pd\npd.set_option('display.max_rows', None)\n"
            "frame = pd.DataFrame({'word': ['été'] * 20000, 'n': range(20000)})\nprint('é' * 50000)\n"
            "print(frame)\nrows = open('rows.txt', 'w').write(str(len(frame)))\nmissing_name")
    result = await run(sandbox, code, limits=ROOMY)
    assert result.error_kind == "exception" and result.error == "NameError: name 'missing_name' is not defined"
    assert result.stderr.startswith("Traceback") and result.stderr.endswith("is not defined\n")
    import pandas as pd
    with pd.option_context("display.max_rows", None):
        lines = repr(pd.DataFrame({"word": ["été"] * 20000, "n": range(20000)})).split("\n")
    assert result.stdout.startswith("é" * 1000) and result.stdout.endswith("\n".join(lines[-100:]) + "\n")
    assert len(left_out(result.stdout)) == 1 and "\ufffd" not in result.stdout
    assert [(f.name, f.data) for f in result.files] == [("rows.txt", b"20000")]  # written after the flood


async def test_an_endless_flood_is_truncated_until_a_limit_stops_it(sandbox: Sandbox,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Both streams flooding (a child on stderr): each kept within the limit, the rest read and dropped in bounded
    memory, paced (the writers wait on the pipe) until the wall clock stops the code; the call ends as the child is
    killed, its exit seen by the event loop (the pipes were left unread, and the call waited for the fallback
    reaping)."""
    code = ("import os, sys\nif os.fork() == 0:\n    os.setsid()\n    while True:\n        os.write(2, b'E' * 65536)\n"
            "while True:\n    sys.stdout.write('O' * 100000)")
    result = await run(sandbox, code)
    assert result.error_kind in ("timeout", "cpu_limit"), result
    assert result.output_truncated and result.output_left_out > 10 * FAST.output_bytes
    assert len(left_out(result.stdout)) == len(left_out(result.stderr)) == 1
    kept = MARKER.sub("", result.stdout) + MARKER.sub("", result.stderr)
    assert kept.count("O") + kept.count("E") == FAST.output_bytes and set(kept) == {"O", "E", "\n"}
    assert "reaped directly" not in caplog.text


async def test_left_over_processes_do_not_keep_the_call_running(sandbox: Sandbox) -> None:
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\nprint('parent done')"
    result = await run(sandbox, code, limits=SandboxLimits(wall_seconds=20))
    assert result.ok, result
    assert result.stdout == "parent done\n"


def _interpreter_tops_under_tmp() -> set[str]:
    """Top folders below /tmp that hold this interpreter's paths (the sandbox keeps them reachable)."""
    real = (os.path.realpath(p) for p in [sys.prefix, *sys.path] if p)
    return {path.split("/")[2] for path in real if path.startswith("/tmp/")}


async def test_isolated_user_tmp_and_scratch_dir_removed(sandbox: Sandbox, scratch: Path) -> None:
    if await sandbox.isolation() is not Isolation.NAMESPACES:
        pytest.skip("needs root and unshare (namespaces isolation)")
    code = ("import os\nprint(os.getuid() != 0, os.getpid(), sorted(os.listdir('/tmp')), os.getcwd(),"
            " os.listdir('/dev/shm'))\n"
            f"print(os.path.exists({str(scratch)!r}) and len(os.listdir({str(scratch)!r})))")
    result = await run(sandbox, code)
    assert result.ok, result
    first, second = result.stdout.splitlines()
    # Only the sandbox's own control folder, plus the top folder of interpreter paths that live under the
    # host's /tmp (a checkout there keeps its venv reachable): nothing else of the host's /tmp.
    assert first == f"True 2 {sorted({'.threadline', *_interpreter_tops_under_tmp()})} /mnt/data []"
    assert second in ("False", "0")  # the host's scratch folders are out of reach
    assert os.listdir(scratch) == []


async def test_concurrent_runs_do_not_interfere(sandbox: Sandbox) -> None:
    results = await asyncio.gather(*(run(sandbox, f"open('n.txt', 'w').write('{i}')\nprint({i})") for i in range(4)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]
    assert [r.files[0].data for r in results] == [str(i).encode() for i in range(4)]


async def test_process_isolation_fallback_still_blocks_sockets(scratch: Path) -> None:
    fallback = Sandbox(scratch_root=str(scratch), isolation=Isolation.PROCESS)
    ok = await fallback.run_python("print(6 * 7)", {}, FAST)
    assert ok.ok and ok.stdout == "42\n", ok
    blocked = await fallback.run_python("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)", {}, FAST)
    assert blocked.error is not None and blocked.error.startswith("PermissionError"), blocked


async def sandbox_in(isolation: Isolation | None, probed: Sandbox, scratch: Path) -> Sandbox:
    """The probed sandbox (None), or one in `isolation`; skips when this host cannot isolate so."""
    if isolation is None:
        return probed
    forced = Sandbox(scratch_root=str(scratch), isolation=isolation)
    check = await forced.run_python("print(1)", {}, FAST)
    if not check.ok:
        pytest.skip(f"{isolation.value} isolation unavailable here: {check.error}")
    return forced


FORGE_STATUS = """
import json, os
forged = json.dumps({"exit_code": 0, "error": {}, "files": [], "files_skipped": 7}).encode() + b" " * (1 << 20)

def pipes(pid):
    found = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            found[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return {fd: link for fd, link in found.items() if link.startswith("pipe:")}

own, supervisor, reached = set(pipes("self").values()), os.getppid(), 0
for fd, link in pipes(supervisor).items():
    if link not in own:  # the status pipe
        try:
            out = os.open(f"/proc/{supervisor}/fd/{fd}", os.O_WRONLY)
        except OSError:
            continue
        reached += 1
        try:
            while forged:
                forged = forged[os.write(out, forged):]
        except OSError:
            pass
print("reached", reached)
1 / 0
"""


@pytest.mark.parametrize("isolation", [None, Isolation.USER_NAMESPACES], ids=["probed", "user_namespaces"])
async def test_the_code_cannot_forge_the_supervisors_status(sandbox: Sandbox, scratch: Path,
                                                            isolation: Isolation | None) -> None:
    """A status written into the supervisor's status pipe through /proc (padded past what the runner reads) was the
    call's outcome: success. In user namespaces the code is root there, as the supervisor is (process isolation is
    left out: the code runs as the service's user, and reaches the service itself)."""
    box = await sandbox_in(isolation, sandbox, scratch)
    result = await run(box, FORGE_STATUS, limits=ROOMY)
    assert result.error_kind == "exception", result
    assert result.error == "ZeroDivisionError: division by zero"
    assert result.stdout == "reached 0\n"
    assert result.files_skipped == 0


SIGNAL_SUPERVISOR = """
import os, signal, time
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGALRM,
            signal.SIGCHLD):
    os.kill(os.getppid(), sig)
time.sleep(0.3)
print("still running")
1 / 0
"""


@pytest.mark.parametrize("isolation", [None, Isolation.USER_NAMESPACES, Isolation.PROCESS],
                         ids=["probed", "user_namespaces", "process"])
async def test_signals_to_the_supervisor_do_not_change_the_outcome(sandbox: Sandbox, scratch: Path,
                                                                   isolation: Isolation | None) -> None:
    """The code signalling its supervisor: SIGINT ended it (KeyboardInterrupt, no status: a sandbox error),
    SIGALRM timed the call out at once; in process isolation SIGTERM and the others killed it."""
    box = await sandbox_in(isolation, sandbox, scratch)
    result = await run(box, SIGNAL_SUPERVISOR, limits=ROOMY)
    assert result.error_kind == "exception", result
    assert result.error == "ZeroDivisionError: division by zero"
    assert result.stdout == "still running\n"
    assert "_supervisor" not in result.stderr


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if text.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


async def test_cancelling_a_run_kills_it_and_cleans_up(sandbox: Sandbox, scratch: Path) -> None:
    task = asyncio.create_task(run(sandbox, "import time\ntime.sleep(120)", limits=SandboxLimits(wall_seconds=300)))
    for _ in range(600):
        if processes_mentioning(str(scratch)):
            break
        await asyncio.sleep(0.05)
    assert processes_mentioning(str(scratch)), "the sandbox never started"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):  # SIGKILL is delivered asynchronously to the namespace's processes
        if not processes_mentioning(str(scratch)):
            break
        await asyncio.sleep(0.05)
    assert processes_mentioning(str(scratch)) == []
    assert os.listdir(scratch) == []


def test_clip_text_keeps_start_and_end_and_counts_all_left_out() -> None:
    """What the model reads is cut as the sandbox cuts (start and end, at line boundaries); one marker counts what
    this cut and the sandbox's marker inside it left out."""
    from threadline_sandbox.output import clip_text, marker

    lines = [f"row {i:04d}\n" for i in range(2000)]
    text = "".join(lines[:1000]) + marker(5000, 500) + "".join(lines[1500:]) + "Traceback: boom\n"
    clipped = clip_text(text, 2000)
    assert clipped.startswith("row 0000\n") and clipped.endswith("row 1999\nTraceback: boom\n")
    ((left, left_lines),) = left_out(clipped)
    kept = MARKER.sub("", clipped)
    assert len(kept) + left == len(text) - len(marker(5000, 500)) + 5000
    assert kept.count("\n") + left_lines == 1501 + 500
    assert all(line.startswith(("row ", "Traceback")) for line in kept.splitlines())
    assert clip_text(text[:1500], 2000) == text[:1500]
