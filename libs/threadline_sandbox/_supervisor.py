"""Runs inside the sandbox: isolates itself, forks the worker that runs the untrusted code, reports.

Started by `threadline_sandbox.runner` as ``python -I -B -u _supervisor.py CONFIG`` (standard library
only). In the namespaces modes it is PID 1 of a fresh PID, network and mount namespace: it mounts
private tmpfs file systems (``/mnt/data`` for the files, ``/tmp`` for everything else, and empty ones
over the host folders the code has no business seeing: ``_HOST_DIRS_HIDDEN``), copies the input files
in, drops to an unprivileged uid, makes itself non-dumpable, sets the resource limits, blocks every signal
(the code could interrupt it, or fire its deadline) and forks the worker, which drops every capability (so
the code can neither open the supervisor's fds through /proc, the status pipe among them, nor trace it),
installs a seccomp filter (``_syscall_filter``: no new namespaces, mounts, bpf, io_uring, keyrings or
vsock), replays the session's earlier cells silently (``_replay``) and runs the code. When the worker ends
(or its wall-clock deadline passes) it copies the generated files out, writes a JSON status to the status
pipe and exits, which kills whatever the code left running in the namespace. The worker's own report (the
code's exception) comes from the process that runs the code: it only says what the code could say by raising.
"""

import ast
import base64
import builtins
import ctypes
import errno
import hashlib
import html.parser
import importlib.abc
import importlib.util
import json
import linecache
import os
import resource
import signal
import stat
import sys
import time
import traceback
import types
from collections.abc import Iterable
from typing import Any

_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_BIND = 0x1000
_MS_REC = 0x4000
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_DUMPABLE = 4
_CAPABILITY_VERSION_3 = 0x20080522
_COPY_CHUNK = 1 << 20
_MAX_ERROR_CHARS = 4000
_SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints"}
_BASELINE = "session_baseline.json"
_MAX_BASELINE_BYTES = 4 << 20

_BACKEND_SOURCE = '''"""Matplotlib backend of the sandbox: plt.show() saves the figures as image outputs."""
import os

from matplotlib._pylab_helpers import Gcf
from matplotlib.backend_bases import FigureManagerBase as FigureManager  # noqa: F401
from matplotlib.backends.backend_agg import FigureCanvasAgg as FigureCanvas  # noqa: F401


def save_figure(figure):
    folder = os.environ["THREADLINE_FIGURES_DIR"]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "figure_%03d.png" % (len(os.listdir(folder)) + 1))
    figure.savefig(path, format="png", dpi=100)  # marks it saved (_mark_saved_figures)


def show(*args, **kwargs):
    for manager in Gcf.get_all_fig_managers():
        if not getattr(manager.canvas.figure, "_threadline_saved", False):  # saved files are outputs already
            save_figure(manager.canvas.figure)
    Gcf.destroy_all()
'''


class SetupError(Exception):
    """The sandbox could not be prepared (reported as a sandbox error, not as the code's fault)."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    result = _libc().mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                           ctypes.c_ulong(flags), data.encode() if data else None)
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError(f"mount {fstype or 'bind'} on {target} failed: {os.strerror(err)}")


def _prctl(option: int, value: int) -> None:
    _libc().prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> None:
    """Give up every capability (the code runs as root of its user namespace, or as root without a uid of its own):
    with the supervisor's, the code could open its fds through /proc (the status pipe) and trace it."""
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    if _libc().capset(ctypes.byref(header), (_CapData * 2)()) != 0:
        raise SetupError(f"could not drop capabilities: {os.strerror(ctypes.get_errno())}")


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_SECCOMP_ARCH = {  # machine -> (AUDIT_ARCH_*, syscall numbers), for the syscalls the filter inspects
    "x86_64": (0xC000003E, {
        "socket": 41, "socketpair": 53, "clone": 56, "unshare": 272, "clone3": 435, "setns": 308, "mount": 165,
        "umount2": 166, "pivot_root": 155, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "bpf": 321, "userfaultfd": 323, "perf_event_open": 298, "add_key": 248,
        "request_key": 249, "keyctl": 250, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427}),
    "aarch64": (0xC00000B7, {
        "socket": 198, "socketpair": 199, "clone": 220, "unshare": 97, "clone3": 435, "setns": 268, "mount": 40,
        "umount2": 39, "pivot_root": 41, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "bpf": 280, "userfaultfd": 282, "perf_event_open": 241, "add_key": 217,
        "request_key": 218, "keyctl": 219, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427}),
}
_NAMESPACE_FLAGS = 0x7E020080  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
_AF_VSOCK = 40
_X32_SYSCALL_BIT = 0x40000000


def _syscall_filter(machine: str) -> list[tuple[int, int, int, int]] | None:
    """A seccomp BPF program (code, jt, jf, k) refusing what Python code has no use for and what widens the
    kernel's attack surface: new namespaces (a user namespace gives the code capabilities inside it), mounts,
    bpf, io_uring, keyrings, perf and userfaultfd, and vsock sockets (the host's hypervisor channel)."""
    if machine not in _SECCOMP_ARCH:
        return None
    arch, nr = _SECCOMP_ARCH[machine]
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000

    def refuse(code: int) -> int:
        return 0x00050000 | code  # SECCOMP_RET_ERRNO

    program = [(load, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (load, 0, 0, 0)]
    if machine == "x86_64":
        program += [(jge, 0, 1, _X32_SYSCALL_BIT), (ret, 0, 0, refuse(errno.ENOSYS))]
    program += [(jeq, 0, 1, nr["clone3"]), (ret, 0, 0, refuse(errno.ENOSYS))]  # glibc falls back to clone
    for name in ("setns", "mount", "umount2", "pivot_root", "open_tree", "move_mount", "fsopen", "fsconfig",
                 "fsmount", "fspick", "bpf", "userfaultfd", "perf_event_open", "add_key", "request_key", "keyctl",
                 "io_uring_setup", "io_uring_enter", "io_uring_register"):
        program += [(jeq, 0, 1, nr[name]), (ret, 0, 0, refuse(errno.EPERM))]
    for name, test, value, code in (("clone", jset, _NAMESPACE_FLAGS, errno.EPERM),
                                    ("unshare", jset, _NAMESPACE_FLAGS, errno.EPERM),
                                    ("socket", jeq, _AF_VSOCK, errno.EAFNOSUPPORT),
                                    ("socketpair", jeq, _AF_VSOCK, errno.EAFNOSUPPORT)):
        program += [(jeq, 0, 4, nr[name]), (load, 0, 0, 16), (test, 0, 1, value), (ret, 0, 0, refuse(code)),
                    (ret, 0, 0, allow)]  # 16: the low half of the first argument (flags, or the socket's family)
    return [*program, (ret, 0, 0, allow)]


def _restrict_syscalls() -> None:
    """Install the seccomp filter on this process and its children (on x86_64 and aarch64; a kernel without
    seccomp leaves the other layers: namespaces, uid, limits)."""
    program = _syscall_filter(os.uname().machine)
    if program is None:
        return
    filters = (_SockFilter * len(program))(*(_SockFilter(*entry) for entry in program))
    fprog = _SockFprog(len(program), filters)
    pr_set_seccomp, seccomp_mode_filter = 22, 2
    _libc().prctl(pr_set_seccomp, ctypes.c_ulong(seccomp_mode_filter), ctypes.byref(fprog), ctypes.c_ulong(0),
                  ctypes.c_ulong(0))


def _digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_COPY_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _copy_file(src_fd: int, dst_fd: int, limit: int) -> int:
    """Copy at most `limit` bytes; return the byte count, or -1 when the source is larger."""
    total = 0
    while chunk := os.read(src_fd, _COPY_CHUNK):
        total += len(chunk)
        if total > limit:
            return -1
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst_fd, view):]
    return total


_HOST_DIRS_HIDDEN = ("/run", "/var/run", "/var/tmp", "/var/lib", "/var/log", "/var/spool", "/var/mail", "/home",
                     "/root", "/srv", "/opt", "/media")
"""Host folders the code never sees (an empty tmpfs over each, the interpreter's folders under them bound back):
local services' Unix sockets (/run/postgresql, /run/mysqld: the network namespace does not cover them), the
host's writable /var/tmp and /run/lock (files that outlive the call, shared between calls), data and logs."""
_FILES_PER_TMPFS = 10_000
"""Inodes of each private tmpfs: files cost kernel memory that its size limit does not count."""


def _outermost_under(target: str, paths: list[str]) -> list[str]:
    """The folders of `paths` that lie under `target`, leaving out those inside another of them."""
    keep: list[str] = []
    for path in sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)}):
        if path.startswith(target + "/") and not any(path.startswith(k + "/") for k in keep):
            keep.append(path)
    return keep


def _hide_host_dirs(expose_paths: list[str]) -> None:
    """Cover `_HOST_DIRS_HIDDEN` with small empty tmpfs mounts, keeping the interpreter's folders under them."""
    covered: set[str] = set()
    for folder in _HOST_DIRS_HIDDEN:
        target = os.path.realpath(folder)
        if target in covered or not os.path.isdir(target):  # /var/run is usually /run
            continue
        covered.add(target)
        _tmpfs_keeping(target, "size=64k,mode=0755,nr_inodes=1000", _outermost_under(target, expose_paths))


def _mount_data(cfg: dict[str, Any], input_bytes: int) -> None:
    """A private tmpfs on /mnt holding /mnt/data, sized for the inputs plus the disk limit."""
    data_size = int(cfg["limits"]["disk_bytes"]) + input_bytes + (1 << 20)
    _mount("tmpfs", "/mnt", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={data_size},mode=0755,nr_inodes={_FILES_PER_TMPFS}")
    os.mkdir(cfg["data_dir"], 0o755)


def _others_can_reach(path: str) -> bool:
    """True when every directory on the way to `path` is searchable by any uid."""
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        try:
            info = os.stat(current)
        except OSError:
            return False
        if stat.S_ISDIR(info.st_mode) and not info.st_mode & stat.S_IXOTH:
            return False
    return True


def _blocking_ancestor(path: str) -> str | None:
    """The top-most directory above `path` that other uids cannot search (None if all can)."""
    current = "/"
    for part in path.strip("/").split("/")[:-1]:
        current = os.path.join(current, part)
        try:
            info = os.stat(current)
        except OSError:
            return None
        if not info.st_mode & stat.S_IXOTH:
            return current
    return None


def _expose(paths: list[str]) -> None:
    """Make the interpreter's folders reachable for the sandbox uid when they sit in a private home.

    A tmpfs replaces the private ancestor (hiding the rest of it) and the needed folders are
    bind-mounted back into it at their original paths.
    """
    wanted = sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)})
    groups: dict[str, list[str]] = {}
    for path in wanted:
        if _others_can_reach(path):
            continue
        ancestor = _blocking_ancestor(path)
        if ancestor is None or any(path.startswith(p + "/") for p in groups.get(ancestor, [])):
            continue
        groups.setdefault(ancestor, []).append(path)
    for ancestor, members in groups.items():
        _tmpfs_keeping(ancestor, "size=1m,mode=0755", members)


def _tmpfs_keeping(target: str, options: str, keep: list[str]) -> None:
    """Mount a tmpfs over `target`, then bind-mount the `keep` folders under it back at their own paths.

    They are opened before the tmpfs hides them, so the bind mounts reach the originals."""
    fds = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in keep}
    try:
        _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
        for path, fd in fds.items():
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC, None)
    finally:
        for fd in fds.values():
            os.close(fd)


def _mount_tmp(cfg: dict[str, Any]) -> None:
    """A private, size-limited /tmp (after the inputs were read: they may live under the host's /tmp).

    Interpreter folders that live under the host's /tmp (a checkout and its venv there) are bind-mounted
    back at their original paths, so the interpreter still finds its standard library and packages.
    """
    size = int(cfg["limits"]["tmp_bytes"])
    keep = _outermost_under("/tmp", cfg.get("expose_paths") or [])
    _tmpfs_keeping("/tmp", f"size={size},mode=1777,nr_inodes={_FILES_PER_TMPFS}", keep)
    if os.path.isdir("/dev/shm"):
        _mount("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size},mode=1777,nr_inodes=1000")


def _copy_inputs(in_dir: str, data_dir: str, uid: int | None, gid: int | None) -> dict[str, str]:
    """Copy the input files into the data dir; return name -> sha256 (to tell generated files apart)."""
    digests: dict[str, str] = {}
    for name in sorted(os.listdir(in_dir)):
        src = os.path.join(in_dir, name)
        dst = os.path.join(data_dir, name)
        src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if _copy_file(src_fd, dst_fd, 1 << 62) < 0:
                    raise SetupError(f"input file {name} could not be copied")
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise SetupError("the input files do not fit in the sandbox") from exc
                raise
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        if uid is not None and gid is not None:
            os.chown(dst, uid, gid)
        digests[name] = _digest(dst)
    if uid is not None and gid is not None:
        os.chown(data_dir, uid, gid)
    return digests


def _drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise SetupError("could not drop privileges")


def _set_limit(which: int, soft: int, hard: int | None = None) -> None:
    resource.setrlimit(which, (soft, soft if hard is None else hard))


def _block_network() -> None:
    """Fallback when no network namespace is available: refuse to create non-local sockets."""
    import socket

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "socket.__new__" and len(args) > 1 and args[1] not in (socket.AF_UNIX, -1):
            raise PermissionError(errno.EACCES, "Network access is disabled in the sandbox")
        if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo"):
            raise PermissionError(errno.EACCES, "Network access is disabled in the sandbox")

    sys.addaudithook(hook)


def _install_backend(ctl_dir: str) -> None:
    lib = os.path.join(ctl_dir, "pylib")
    os.makedirs(lib, exist_ok=True)
    with open(os.path.join(lib, "_threadline_mpl_backend.py"), "w") as handle:
        handle.write(_BACKEND_SOURCE)
    sys.path.append(lib)


def _mark_saved_figures() -> None:
    """Mark a figure saved to a file (`Figure.savefig` wrapped once matplotlib.figure loads), so the end of the
    cell does not show it again: its file is an output already. Done on import, whatever backend the code picks
    (`matplotlib.use('Agg')` skipped the sandbox's backend, and a saved chart came out twice)."""

    class SavefigMarker(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name != "matplotlib.figure":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            loader = spec.loader if spec is not None else None
            if loader is None:
                return spec
            load = loader.exec_module

            def exec_module(module: types.ModuleType) -> None:
                load(module)
                original = module.Figure.savefig

                def savefig(self: Any, *args: Any, **kwargs: Any) -> Any:
                    self._threadline_saved = True
                    return original(self, *args, **kwargs)

                module.Figure.savefig = savefig

            loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, SavefigMarker())


def _flush_figures() -> None:
    """Figures still open at the end are shown (as in a notebook cell), unless already saved to a file."""
    if "matplotlib.pyplot" not in sys.modules:
        return
    from matplotlib._pylab_helpers import Gcf  # type: ignore[import-untyped, import-not-found, unused-ignore]

    for manager in list(Gcf.get_all_fig_managers()):
        if not getattr(manager.canvas.figure, "_threadline_saved", False):
            _show_figure(manager.canvas.figure)


def _figure_path(extension: str) -> str:
    """Where the next image output goes (numbered as the sandbox backend numbers figures)."""
    folder = os.environ["THREADLINE_FIGURES_DIR"]
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"figure_{len(os.listdir(folder)) + 1:03d}.{extension}")


def _show_figure(figure: Any) -> None:
    """Save the figure as an image output (savefig marks it saved: `_mark_saved_figures`)."""
    backend = sys.modules.get("_threadline_mpl_backend")
    if backend is not None:
        backend.save_figure(figure)
        return
    figure.savefig(_figure_path("png"), format="png")


_IMAGE_EXTENSIONS = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"))


def _show_image(data: bytes) -> bool:
    """PNG, JPEG, GIF or WebP bytes become an image output, as a figure does; False for anything else."""
    extension = next((ext for signature, ext in _IMAGE_EXTENSIONS if data.startswith(signature)), None)
    if extension is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        extension = "webp"
    if extension is None:
        return False
    with open(_figure_path(extension), "wb") as handle:
        handle.write(data)
    return True


class _HtmlText(html.parser.HTMLParser):
    """The text of HTML as a reader sees it: a line per block, table cells separated by ' | ', no scripts or styles."""

    _BLOCKS = frozenset({"address", "article", "aside", "blockquote", "caption", "dd", "div", "dl", "dt", "figcaption",
                         "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main",
                         "nav", "ol", "p", "pre", "section", "table", "tbody", "tfoot", "thead", "tr", "ul"})
    _HIDDEN = frozenset({"script", "style", "head", "template"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._line: list[str] = []
        self._hidden = 0
        self._pre = 0
        self._cells = 0

    def _end_line(self) -> None:
        text = "".join(self._line)
        text = text.rstrip() if self._pre else " ".join(text.split())  # HTML collapses whitespace outside <pre>
        if text:
            self.lines.append(text)
        self._line = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag == "br":
            self._end_line()
        elif tag in ("td", "th"):
            if self._cells:
                self._line.append(" | ")
            self._cells += 1
        elif tag in self._BLOCKS:
            self._end_line()
            self._pre += tag == "pre"
            if tag == "tr":
                self._cells = 0
            elif tag == "li":
                self._line.append("- ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self._BLOCKS:
            self._end_line()
            self._pre = max(0, self._pre - (tag == "pre"))

    def handle_data(self, data: str) -> None:
        if self._hidden:
            return
        if not self._pre:
            self._line.append(data)
            return
        first, *rest = data.split("\n")
        self._line.append(first)
        for line in rest:
            self._end_line()
            self._line.append(line)

    def text(self) -> str:
        self.close()
        self._end_line()
        return "\n".join(self.lines)


def _html_text(markup: str) -> str:
    parser = _HtmlText()
    parser.feed(markup)
    return parser.text()


class _DisplayObject:
    """IPython.display's DisplayObject: data, or the content of `filename` (a string naming a file is taken as one),
    or a `url` (which the sandbox cannot fetch). Displayed, it prints its text; the `Image` subclass shows itself as
    an image output."""

    _read_mode = "r"

    def __init__(self, data: Any = None, url: str | None = None, filename: Any = None,
                 metadata: dict[str, Any] | None = None) -> None:
        if isinstance(data, os.PathLike):
            data = os.fspath(data)
        if isinstance(data, str) and url is None and filename is None:
            if data.startswith(("http://", "https://")):
                url, data = data, None
            elif _is_file(data):
                filename, data = data, None
        self.data, self.url, self.metadata = data, url, dict(metadata or {})
        self.filename = os.fspath(filename) if filename is not None else None
        self.reload()

    def reload(self) -> None:
        """Read the file again (IPython's name for it)."""
        if self.filename is not None:
            with open(self.filename, self._read_mode) as handle:
                self.data = handle.read()

    def __repr__(self) -> str:
        return f"<IPython.core.display.{type(self).__name__} object>"

    def _text(self) -> str:
        if self.data is None:
            return self.url or repr(self)
        return self.data if isinstance(self.data, str) else str(self.data)

    def _show(self) -> None:
        print(self._text())


def _is_file(text: str) -> bool:
    try:
        return len(text) < 4096 and "\n" not in text and os.path.isfile(text)
    except (OSError, ValueError):
        return False


class _TextDisplayObject(_DisplayObject):
    """Text shown as it is (Markdown, LaTeX, pretty text)."""


class _HTML(_TextDisplayObject):
    def _text(self) -> str:
        return _html_text(self.data) if isinstance(self.data, str) else super()._text()


class _Markdown(_TextDisplayObject):
    pass


class _Latex(_TextDisplayObject):
    pass


class _Math(_TextDisplayObject):
    pass


class _Pretty(_TextDisplayObject):
    pass


class _JSON(_DisplayObject):
    def __init__(self, data: Any = None, url: str | None = None, filename: Any = None, expanded: bool = False,
                 metadata: dict[str, Any] | None = None, root: str = "root", **_options: Any) -> None:
        super().__init__(data, url, filename, metadata)

    def _text(self) -> str:
        if self.data is None or isinstance(self.data, str):
            return super()._text()
        return json.dumps(self.data, indent=2, default=str)


class _Image(_DisplayObject):
    """An image from bytes or a file: shown as an image output when it is a PNG, JPEG, GIF or WebP."""

    _read_mode = "rb"

    def __init__(self, data: Any = None, url: str | None = None, filename: Any = None, format: str | None = None,
                 embed: bool | None = None, width: Any = None, height: Any = None, retina: bool = False,
                 unconfined: bool = False, metadata: dict[str, Any] | None = None, alt: str | None = None) -> None:
        if data is None and url is None and filename is None:
            raise ValueError("No image data found. Expecting filename, url, or data.")
        if isinstance(data, bytearray | memoryview):
            data = bytes(data)
        self.format, self.embed, self.width, self.height, self.alt = format, embed, width, height, alt
        super().__init__(data, url, filename, metadata)
        if isinstance(self.data, str):  # neither a file nor a URL: a misspelt path
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", self.data)

    def _text(self) -> str:
        return repr(self)

    def _show(self) -> None:
        if not (isinstance(self.data, bytes) and _show_image(self.data)):
            print(self._text())


for _cls, _name in ((_DisplayObject, "DisplayObject"), (_TextDisplayObject, "TextDisplayObject"), (_HTML, "HTML"),
                    (_Markdown, "Markdown"), (_Latex, "Latex"), (_Math, "Math"), (_Pretty, "Pretty"), (_JSON, "JSON"),
                    (_Image, "Image")):
    _cls.__name__ = _cls.__qualname__ = _name
    _cls.__module__ = "IPython.core.display"


def _rich_image(shown: Any) -> bytes | None:
    """The PNG or JPEG an object renders itself as in a notebook (`_repr_png_`, as a PIL image does), else None."""
    for method in ("_repr_png_", "_repr_jpeg_"):
        render = getattr(type(shown), method, None)
        if callable(render):
            try:
                data = render(shown)
            except Exception:
                continue
            if isinstance(data, bytes):
                return data
    return None


def _display(*objects: Any, raw: bool = False, **_options: Any) -> None:
    """IPython's `display`, which code written for hosted's notebook kernel calls (`display(df)`): a matplotlib figure
    or an image (`IPython.display.Image`, an object with `_repr_png_`) becomes an image output, HTML or Markdown prints
    its text, anything else prints its repr, as a cell's last value does."""
    for shown in objects:
        if raw:
            _display_raw(shown)
        elif isinstance(shown, _DisplayObject):
            shown._show()
        elif type(shown).__module__.startswith("matplotlib.") and hasattr(shown, "savefig"):
            _show_figure(shown)
        elif (image := _rich_image(shown)) is None or not _show_image(image):
            print(repr(shown))


def _display_raw(bundle: Any) -> None:
    """`display(..., raw=True)`: a MIME bundle (an image, else its plain text, Markdown or HTML's text)."""
    if not isinstance(bundle, dict):
        print(bundle)
        return
    for mime in ("image/png", "image/jpeg"):
        data = bundle.get(mime)
        if isinstance(data, str):
            try:
                data = base64.b64decode(data)
            except ValueError:
                continue
        if isinstance(data, bytes) and _show_image(data):
            return
    for mime, convert in (("text/plain", str), ("text/markdown", str), ("text/html", _html_text)):
        if isinstance(bundle.get(mime), str):
            print(convert(bundle[mime]))
            return
    print(repr(bundle))


def _display_as(kind: type[_DisplayObject]) -> Any:
    """IPython's `display_html`, `display_markdown`, ...: raw data is made a `kind`; other objects are displayed."""

    def show(*objects: Any, raw: bool = False, metadata: Any = None) -> None:
        for shown in objects:
            _display(kind(data=shown) if raw else shown)

    show.__name__ = f"display_{kind.__name__.lower()}"
    return show


def _clear_output(wait: bool = False) -> None:
    """Output already written stays (the run step keeps all of it)."""


def _get_ipython() -> None:
    """None: no IPython shell runs here (what libraries check before using one)."""
    return None


class _CallableModule(types.ModuleType):
    """`IPython.display`, callable too: `from IPython import display` gives the module in IPython 7 and the function
    in IPython 8; code written for either works."""

    def __call__(self, *objects: Any, **options: Any) -> None:
        _display(*objects, **options)


def _ipython_modules() -> dict[str, types.ModuleType]:
    """The stand-in `IPython` package: `get_ipython`, `display` and `IPython.display`'s names for showing output."""
    display = _CallableModule("IPython.display", "Show objects as a notebook does, in the sandbox's outputs.")
    names: dict[str, Any] = {
        "display": _display, "clear_output": _clear_output, "DisplayObject": _DisplayObject,
        "TextDisplayObject": _TextDisplayObject, "HTML": _HTML, "Markdown": _Markdown, "Latex": _Latex,
        "Math": _Math, "Pretty": _Pretty, "JSON": _JSON, "Image": _Image,
        "display_html": _display_as(_HTML), "display_markdown": _display_as(_Markdown),
        "display_latex": _display_as(_Latex), "display_pretty": _display_as(_Pretty),
        "display_json": _display_as(_JSON), "display_png": _display_as(_Image), "display_jpeg": _display_as(_Image)}
    display.__dict__.update(names)
    display.__all__ = sorted(names)  # type: ignore[attr-defined]
    core = types.ModuleType("IPython.core")
    core.display = display  # type: ignore[attr-defined]
    package = types.ModuleType("IPython", "Stand-in for IPython in the sandbox: display() shows output as in a "
                                          "notebook; get_ipython() is None (no shell runs).")
    package.__dict__.update({"get_ipython": _get_ipython, "display": display, "core": core})
    return {"IPython": package, "IPython.display": display, "IPython.core": core, "IPython.core.display": display}


def _provide_display(data_dir: str) -> None:
    """`display` as a builtin, as in a notebook kernel, and `IPython` (`IPython.display`'s display, HTML, Markdown,
    Image ...; `get_ipython()`) for the code's own imports when no real IPython is installed.

    The stand-in never enters sys.modules and libraries never get it: matplotlib, pandas, plotly, patsy and tqdm look
    there or import IPython to tell whether they run in a notebook (and call IPython's internals if so), so they go
    on as without IPython whether the code imports it before or after them. It is served by `__import__` to imports
    made in the code's cells (`__main__`) or modules under the data dir."""
    builtins.display = _display  # type: ignore[attr-defined]
    if importlib.util.find_spec("IPython") is not None:
        return
    modules = _ipython_modules()
    original = builtins.__import__
    data_root = os.path.realpath(data_dir) + os.sep

    def from_the_code(scope: Any) -> bool:
        if not isinstance(scope, dict):
            scope = sys._getframe(2).f_globals
        if scope.get("__name__") in (None, "__main__"):
            return True
        path = scope.get("__file__")
        return isinstance(path, str) and os.path.realpath(path).startswith(data_root)

    def standin_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (),
                       level: int = 0) -> Any:
        if level == 0 and name.partition(".")[0] == "IPython" and from_the_code(globals):
            if name not in modules:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return modules[name] if fromlist else modules["IPython"]
        return original(name, globals, locals, fromlist, level)

    builtins.__import__ = standin_import


def _error_line(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    text = lines[-1].strip() if lines else type(exc).__name__
    return text[:_MAX_ERROR_CHARS]


def _main_namespace() -> dict[str, Any]:
    """A fresh `__main__`, shared by the session's cells as a notebook kernel's is."""
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    return module.__dict__


def _execute(code: str, namespace: dict[str, Any], filename: str = "<code>") -> tuple[int, dict[str, Any]]:
    """Run the code as a notebook cell would: the value of a final expression is printed."""
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    try:
        tree = ast.parse(code, filename, "exec")
        last: ast.Expression | None = None
        final = tree.body[-1] if tree.body else None
        if isinstance(final, ast.Expr):
            tree.body.pop()
            last = ast.Expression(final.value)
        exec(compile(tree, filename, "exec"), namespace)
        if last is not None:
            value = eval(compile(last, filename, "eval"), namespace)
            if isinstance(value, _DisplayObject):  # HTML(...) or Image(...) last: shown, as in a notebook
                _display(value)
            elif value is not None:
                print(repr(value))
        _flush_figures()
    except SystemExit as exc:
        code_value = exc.code
        if code_value is None or code_value == 0:
            return 0, {}
        if not isinstance(code_value, int):
            print(code_value, file=sys.stderr)
            code_value = 1
        return code_value, {"type": "SystemExit", "message": f"SystemExit: {exc.code}"}
    except BaseException as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != filename:
            tb = tb.tb_next
        sys.stderr.write("".join(traceback.format_exception(type(exc), exc, tb)))
        return 1, {"type": type(exc).__name__, "message": _error_line(exc)}
    return 0, {}


def _snapshot(data_dir: str) -> dict[str, str]:
    """Every file under the data dir (relative path -> sha256), as `_collect` names them."""
    digests: dict[str, str] = {}
    for root, dirs, files in os.walk(data_dir, followlinks=False):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in files:
            path = os.path.join(root, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                digests[os.path.relpath(path, data_dir)] = _digest(path)
    return digests


def _replay(cfg: dict[str, Any], namespace: dict[str, Any]) -> None:
    """Run the session's earlier cells again, silently: their variables, imports and files are there for the
    code, as in the hosted API's stateful session; their output and figures are not shown again, and the files
    they leave count as already there (`_collect` reads the baseline written here)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        for index, cell in enumerate(cfg["session_cells"], 1):
            _execute(cell, namespace, f"<cell {index}>")
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
    figures = os.environ["THREADLINE_FIGURES_DIR"]
    for name in os.listdir(figures) if os.path.isdir(figures) else []:
        os.unlink(os.path.join(figures, name))
    with open(os.path.join(cfg["ctl_dir"], _BASELINE), "w") as handle:
        json.dump(_snapshot(cfg["data_dir"]), handle)


def _worker(cfg: dict[str, Any], report_fd: int, close_fds: list[int], mask: Iterable[int]) -> None:
    """The forked child: its own limits, then the untrusted code. Never returns."""
    status = 70
    worker_pid = os.getpid()
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for fd in close_fds:
            os.close(fd)
        _drop_capabilities()
        limits = cfg["limits"]
        cpu = max(1, int(limits["cpu_seconds"] + 0.999))
        _set_limit(resource.RLIMIT_CPU, cpu, cpu + 1)
        _set_limit(resource.RLIMIT_AS, int(limits["memory_bytes"]))
        if cfg["block_network_in_process"]:
            _block_network()
        _restrict_syscalls()
        os.chdir(cfg["data_dir"])
        sys.argv = ["python"]
        sys.stdin = open(os.devnull)
        namespace = _main_namespace()
        _mark_saved_figures()
        _provide_display(cfg["data_dir"])
        if cfg.get("session_cells"):
            _replay(cfg, namespace)
        status, error = _execute(cfg["code"], namespace)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.getpid() == worker_pid:  # not in a child the code forked
            try:
                os.write(report_fd, json.dumps(error).encode()[:16000])
            except OSError:
                pass
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(status)


def _baseline(cfg: dict[str, Any], inputs: dict[str, str]) -> dict[str, str]:
    """The files there before the code ran: the inputs, or what the session's replayed cells left."""
    try:
        with open(os.path.join(cfg["ctl_dir"], _BASELINE), "rb") as handle:
            found = json.loads(handle.read(_MAX_BASELINE_BYTES))
    except (OSError, ValueError):
        return inputs
    if not isinstance(found, dict):
        return inputs
    return {str(name): str(digest) for name, digest in found.items()}


def _generated_digests(candidates: list[tuple[str, str, str]], inputs: dict[str, str]) -> set[str]:
    """The sha256 of each file the code generated (new or changed): an image it also displayed is one output."""
    digests: set[str] = set()
    for kind, name, path in candidates:
        if kind == "file":
            try:
                if stat.S_ISREG(os.lstat(path).st_mode) and (digest := _digest(path)) != inputs.get(name):
                    digests.add(digest)
            except OSError:
                continue
    return digests


def _collect(cfg: dict[str, Any], inputs: dict[str, str], out_fd: int) -> tuple[list[dict[str, Any]], int]:
    """Copy generated files (new or changed) and figures out; return the manifest and how many were skipped."""
    inputs = _baseline(cfg, inputs)
    limits = cfg["limits"]
    max_files, max_file, max_total = int(limits["max_files"]), int(limits["max_file_bytes"]), int(
        limits["max_total_file_bytes"])
    candidates: list[tuple[str, str, str]] = []
    figures_dir = os.path.join(cfg["ctl_dir"], "figures")
    if os.path.isdir(figures_dir):
        for name in sorted(os.listdir(figures_dir)):
            candidates.append(("figure", name, os.path.join(figures_dir, name)))
    data_dir = cfg["data_dir"]
    for root, dirs, files in os.walk(data_dir, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            candidates.append(("file", os.path.relpath(path, data_dir), path))
    manifest: list[dict[str, Any]] = []
    skipped = 0
    total = 0
    generated = _generated_digests(candidates, inputs) if any(k == "figure" for k, _, _ in candidates) else set()
    for kind, name, path in candidates:
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        if kind == "file" and name in inputs and _digest(path) == inputs[name]:
            continue
        if kind == "figure" and _digest(path) in generated:  # display(Image('chart.png')) of a chart it saved
            continue
        if len(manifest) >= max_files or info.st_size > max_file or total + info.st_size > max_total:
            skipped += 1
            continue
        target = f"out_{len(manifest):04d}"
        src_fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            dst_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=out_fd)
            try:
                size = _copy_file(src_fd, dst_fd, max_file)
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        if size < 0:
            os.unlink(target, dir_fd=out_fd)
            skipped += 1
            continue
        total += size
        manifest.append({"kind": kind, "name": name, "path": target, "size": size})
    return manifest, skipped


def _read_report(fd: int) -> dict[str, Any]:
    os.set_blocking(fd, False)
    data = b""
    try:
        while len(data) < 16000 and (chunk := os.read(fd, 16000)):
            data += chunk
    except (BlockingIOError, OSError):
        pass
    try:
        parsed = json.loads(data.decode("utf-8", "replace")) if data else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _wait(pid: int, seconds: float) -> tuple[int, resource.struct_rusage, bool]:
    """Wait for the worker, killing it after `seconds`: its wait status, its rusage and whether it was killed so.
    SIGCHLD is taken blocked, by sigtimedwait: one the code sends only wakes the loop (a SIGALRM handler was the
    deadline, and the code could send SIGALRM to time its own call out)."""
    deadline = time.monotonic() + seconds
    while True:
        done, status, rusage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, rusage, False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.kill(pid, signal.SIGKILL)  # not yet waited for: a zombie at worst, never another process
            _, status, rusage = os.wait4(pid, 0)
            return status, rusage, True
        signal.sigtimedwait({signal.SIGCHLD}, remaining)


def supervise(cfg: dict[str, Any], status_fd: int) -> dict[str, Any]:
    """Prepare, run the worker under its limits and collect its results."""
    result: dict[str, Any] = {"exit_code": None, "signal": None, "timed_out": False, "cpu_seconds": None,
                              "error": {}, "files": [], "files_skipped": 0, "setup_error": None}
    limits = cfg["limits"]
    uid, gid = cfg.get("uid"), cfg.get("gid")
    try:
        out_fd = os.open(cfg["out_dir"], os.O_RDONLY | os.O_DIRECTORY)
        input_bytes = sum(os.lstat(os.path.join(cfg["in_dir"], n)).st_size for n in os.listdir(cfg["in_dir"]))
        if cfg["mounts"]:
            _mount_data(cfg, input_bytes)
        else:
            os.makedirs(cfg["data_dir"], exist_ok=True)
        inputs = _copy_inputs(cfg["in_dir"], cfg["data_dir"], uid, gid)
        if cfg["mounts"]:
            if uid is not None:
                _expose(cfg.get("expose_paths") or [])
            _hide_host_dirs(cfg.get("expose_paths") or [])
            _mount_tmp(cfg)
        ctl_dir = cfg["ctl_dir"]
        os.makedirs(ctl_dir, mode=0o700, exist_ok=True)
        if uid is not None and gid is not None:
            os.chown(ctl_dir, uid, gid)
            _drop_privileges(uid, gid)
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        # after the uid change (which sets it to fs.suid_dumpable): the worker, of the same uid, then cannot open
        # /proc/1/fd (the status pipe, the out dir) to forge the status, nor trace it, without CAP_SYS_PTRACE
        _prctl(_PR_SET_DUMPABLE, 0)
        _set_limit(resource.RLIMIT_NPROC, int(cfg["nproc"]))
        _set_limit(resource.RLIMIT_FSIZE, int(limits["max_file_bytes"]))
        _set_limit(resource.RLIMIT_NOFILE, int(limits["open_files"]))
        _set_limit(resource.RLIMIT_CORE, 0)
        home = os.path.join(ctl_dir, "home")
        os.makedirs(home, exist_ok=True)
        os.environ.update({"HOME": home, "TMPDIR": cfg["tmp_dir"], "MPLCONFIGDIR": os.path.join(ctl_dir, "mpl"),
                           "THREADLINE_FIGURES_DIR": os.path.join(ctl_dir, "figures"),
                           "MPLBACKEND": "module://_threadline_mpl_backend"})
        _install_backend(ctl_dir)
    except (OSError, SetupError) as exc:
        result["setup_error"] = str(exc)[:_MAX_ERROR_CHARS]
        return result
    report_r, report_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    # the code may signal the supervisor (same uid; as PID 1 of its namespace it gets the signals it handles, as
    # SIGINT's KeyboardInterrupt): every signal stays blocked in it, the worker gets the interpreter's mask back
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = os.fork()
    except OSError as exc:
        result["setup_error"] = f"could not start the worker: {exc}"
        return result
    if pid == 0:
        _worker(cfg, report_w, [report_r, out_fd, status_fd], mask)
    os.close(report_w)
    status, rusage, result["timed_out"] = _wait(pid, float(limits["wall_seconds"]))
    result["cpu_seconds"] = round(rusage.ru_utime + rusage.ru_stime, 4)
    if os.WIFEXITED(status):
        result["exit_code"] = os.WEXITSTATUS(status)
    elif os.WIFSIGNALED(status):
        result["signal"] = os.WTERMSIG(status)
    result["error"] = _read_report(report_r)
    try:
        result["files"], result["files_skipped"] = _collect(cfg, inputs, out_fd)
    except OSError as exc:
        result["setup_error"] = f"could not collect the generated files: {exc}"[:_MAX_ERROR_CHARS]
    return result


def main() -> None:
    """Entry point: CONFIG path as the only argument; the status goes to the fd named in it."""
    with open(sys.argv[1]) as handle:
        cfg = json.load(handle)
    status_fd = int(cfg["status_fd"])
    started = time.monotonic()
    try:
        result = supervise(cfg, status_fd)
    except Exception as exc:
        result = {"setup_error": f"sandbox supervisor failed: {exc!r}"[:_MAX_ERROR_CHARS]}
    result["supervisor_seconds"] = round(time.monotonic() - started, 4)
    payload = json.dumps(result).encode()
    view = memoryview(payload)
    while view:
        view = view[os.write(status_fd, view):]
    os.close(status_fd)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
