"""`make run`: start the whole local stack in the foreground; Ctrl-C stops everything cleanly.

Broker: tansu (unless KAFKA_BOOTSTRAP_SERVERS); Postgres: embedded under .threadline/pgdata (unless
DATABASE_URL); Qdrant: local mode under .threadline/qdrant (unless QDRANT_URL); model: the offline
deterministic model server (unless THREADLINE_MODEL_BASE_URL); then the five services as processes,
logging to .threadline/logs/<name>.log. A service that dies is restarted (at most 3 times a minute); so is
the broker, empty (its storage is memory), with a message saying what that lost.
"""

import signal
import sys
import time
from collections import deque
from types import FrameType

from threadline_devstack._proc import tail
from threadline_devstack.stack import Stack, StackConfig, StackError


def _say(line: str) -> None:
    print(f"  {line}", flush=True)


def _interrupt(signum: int, _: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


BROKER_LOST = """
The broker (tansu, in-memory storage) died and was started again on the same port, empty: it lost its
topics (created again), the consumer groups' offsets and every event it held that no service had consumed
yet. Events not yet published are published now; queued runs whose command was lost get it again within a
minute, run and project streams take what they lack from the event log, the webhooks of lost events are
sent from the event log within two minutes, a vector store file whose ingestion request was lost gets it
again within a minute, and a lost server-side tool call is sent again after its timeout.
Restart `make run` for a clean state. Broker log: {log}
"""


def _supervise(stack: Stack) -> None:
    """Restart a service (or the broker) that exits unexpectedly; give up if one keeps crashing."""
    crashes: dict[str, deque[float]] = {}
    while True:
        time.sleep(1.0)
        if stack.broker is not None and not stack.broker.running():
            log = stack.broker.log_path
            print(f"\nthe broker exited; last log lines ({log}):\n{tail(log) if log else ''}", flush=True)
            _count_crash(crashes, "broker")
            stack.revive_broker()
            print(BROKER_LOST.format(log=log), flush=True)
        for proc in stack.processes:
            if proc.running():
                continue
            print(f"\n{proc.name} exited with code {proc.returncode}; last log lines ({proc.log_path}):\n"
                  f"{proc.log_tail(30)}\n", flush=True)
            _count_crash(crashes, proc.name)
            print(f"restarting {proc.name} ...", flush=True)
            proc.start(wait=False)


def _count_crash(crashes: dict[str, deque[float]], name: str) -> None:
    """Note a crash of `name`; raise StackError at the third within a minute."""
    recent = crashes.setdefault(name, deque(maxlen=3))
    recent.append(time.monotonic())
    if len(recent) == recent.maxlen and recent[-1] - recent[0] < 60:
        raise StackError(f"{name} keeps crashing; stopping")


def main() -> int:
    """Start, print where everything is, supervise until Ctrl-C, stop in reverse order."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (background job)
    config = StackConfig.from_env("run")
    stack = Stack(config, report=_say)
    print("Starting Threadline ...", flush=True)
    code = 0
    try:
        stack.start()
        print(f"""
Threadline is running.
  API:      {stack.base_url}
  API key:  {stack.api_key}
  logs:     {stack.logs_dir}/<service>.log

  Point the OpenAI SDK at it:
    export OPENAI_BASE_URL={stack.base_url}
    export OPENAI_API_KEY={stack.api_key}

Press Ctrl-C to stop.""", flush=True)
        _supervise(stack)
    except KeyboardInterrupt:
        print("\nStopping Threadline ...", flush=True)
    except Exception as exc:
        print(f"\nError: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        print("Stopped.", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
