"""Run untrusted Python in a separate, resource-limited process without network access."""

from threadline_sandbox.models import ErrorKind, Isolation, SandboxFile, SandboxLimits, SandboxResult
from threadline_sandbox.runner import Sandbox, probe_isolation, run_python, stronger_or_equal, sweep_scratch

__all__ = ["ErrorKind", "Isolation", "Sandbox", "SandboxFile", "SandboxLimits", "SandboxResult", "probe_isolation",
           "run_python", "stronger_or_equal", "sweep_scratch"]
