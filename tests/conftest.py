"""Session fixtures: the real stack (broker, Postgres, services as processes) and clients pointed at it.

The stack starts lazily, once per session, the first time a test asks for `stack` (or a fixture built
on it); tests marked `unit` must not ask for it. Services are configured for tests by the environment
below, which a test cannot change later: add what your service needs to TEST_SERVICE_ENV (all services)
or TEST_SERVICE_ENV_BY_SERVICE (one service).
"""

import asyncio
import os
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from types import FrameType
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from threadline_core.db import create_pool, run_migrations
from threadline_devstack.model_server import ScriptedModelServer
from threadline_devstack.postgres import ExternalPostgres
from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack, StackConfig

TEST_SERVICE_ENV: dict[str, str] = {
    "THREADLINE_LOG_LEVEL": "INFO",
    "THREADLINE_SHUTDOWN_GRACE_SECONDS": "5",
    "THREADLINE_DB_POOL_MIN_SIZE": "1",
    "THREADLINE_MODEL_TIMEOUT_SECONDS": "3",
    "THREADLINE_MODEL_MAX_RETRIES": "0",
    "THREADLINE_WEBHOOK_RETRY_SCHEDULE": "0,0.5,1,2",
    "THREADLINE_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",  # test receivers listen on loopback
    "THREADLINE_WEBHOOK_SCHEDULER_INTERVAL_SECONDS": "0.2",
}
"""Environment of every service process in the test stack (test-friendly timeouts)."""

OTHER_KEY = "sk-threadline-other"
"""The API key of a second project, proj_other (isolation tests: `other_client`)."""

TEST_SERVICE_ENV_BY_SERVICE: dict[str, dict[str, str]] = {
    "gateway": {"THREADLINE_API_KEYS": f'{{"{OTHER_KEY}": "proj_other"}}',  # 2nd project (isolation tests)
                "THREADLINE_SSE_HEARTBEAT_SECONDS": "1", "THREADLINE_UPLOAD_SWEEP_INTERVAL_SECONDS": "0.5",
                "THREADLINE_MAX_FILE_BYTES": str(4 * 1024 * 1024)},  # test_files: 413 without a huge upload
    "run_orchestrator": {"THREADLINE_SHUTDOWN_DRAIN_SECONDS": "3",
                         # requires_action runs expire after 10 s; leases/sweeps fast enough for crash tests
                         "THREADLINE_REQUIRES_ACTION_TIMEOUT_SECONDS": "10", "THREADLINE_LEASE_SECONDS": "6",
                         "THREADLINE_SWEEP_INTERVAL_SECONDS": "0.5",
                         "THREADLINE_MODEL_ALIASES": "gpt-4-32k=llama3.1:8b",  # test_model_compat
                         "THREADLINE_IMAGE_FETCH_ALLOWED_NETWORKS": "127.0.0.0/8",  # test_model_compat: loopback images
                         "THREADLINE_MODEL_LIST_CACHE_SECONDS": "1"},  # test_models: the model server's list changes
    "tool_executor": {"THREADLINE_SANDBOX_DIR": ".threadline/sandbox"},  # scratch of code_interpreter runs
    "ingestion": {"THREADLINE_INGESTION_PARSE_TIMEOUT_SECONDS": "30",  # test_ingestion: a pathological file
                  "THREADLINE_UNCLAIMED_INGESTION_SECONDS": "3"},  # test_ingestion: a lost request is sent again
    # test_webhooks: the catch-up from the event log delivers what the broker lost within a few seconds
    "notifier": {"THREADLINE_WEBHOOK_CATCHUP_GRACE_SECONDS": "1",
                 "THREADLINE_WEBHOOK_CATCHUP_INTERVAL_SECONDS": "0.25"},
}
"""Extra environment for one service (applied after TEST_SERVICE_ENV)."""

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("no_proxy", "127.0.0.1,localhost")


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers the suite uses."""
    config.addinivalue_line("markers", "unit: pure tests that need no stack (run with -m unit)")
    config.addinivalue_line("markers", "slow: tests that take more than a few seconds")


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The whole stack, started once per session (real tansu, Postgres, five service processes)."""
    config = StackConfig.from_env("test", common_env=dict(TEST_SERVICE_ENV),
                                  service_env={k: dict(v) for k, v in TEST_SERVICE_ENV_BY_SERVICE.items()})
    request.config.stash[_LOGS_KEY] = str(config.logs_dir)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # teardown still runs: no orphans
    running = Stack(config, report=print)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _sigterm_as_interrupt(signum: int, _: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


_LOGS_KEY = pytest.StashKey[str]()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Point at the service logs of this session when something failed."""
    logs = config.stash.get(_LOGS_KEY, None)
    if logs and exitstatus != 0:
        terminalreporter.write_line(f"service logs of this session: {logs}")


@pytest.fixture(scope="session")
def model(stack: Stack) -> ScriptedModelServer:
    """The scripted model server every service talks to (records requests in `model.requests`)."""
    assert stack.model is not None
    return stack.model


@pytest.fixture(scope="session")
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    """The official SDK pointed at the gateway (no retries, so errors surface as they are)."""
    sdk = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=60)
    yield sdk
    sdk.close()


@pytest.fixture(scope="session")
def other_client(stack: Stack) -> Iterator[openai.OpenAI]:
    """The official SDK with another project's key (`OTHER_KEY`): what one project must never see of another's."""
    sdk = openai.OpenAI(base_url=stack.base_url, api_key=OTHER_KEY, max_retries=0, timeout=30)
    yield sdk
    sdk.close()


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    """Raw HTTP against the gateway, authenticated: endpoints the SDK lacks, bodies its types would refuse."""
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {stack.api_key}"},
                      trust_env=False, timeout=30) as raw:
        yield raw


@pytest.fixture(scope="session")
async def async_client(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    """The async SDK pointed at the gateway (session event loop)."""
    sdk = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=60)
    yield sdk
    await sdk.close()


@pytest.fixture(scope="session")
def db(stack: Stack) -> Db:
    """SQL access to the stack's database (`db.fetch(...)` sync, `await db.afetch(...)` async)."""
    return Db(stack.database_url)


@pytest.fixture
async def pool(stack: Stack) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh, migrated database of the stack's server, dropped afterwards: for tests that must own every
    row (retention, catch-up passes) while the stack's services write to theirs."""
    database = ExternalPostgres(str(httpx.URL(stack.database_url).copy_with(path="/postgres")), fresh_database=True)
    await asyncio.to_thread(database.start)
    try:
        await run_migrations(database.dsn)
        pool = await create_pool(database.dsn, min_size=1, max_size=3)
        try:
            yield pool
        finally:
            await pool.close()
    finally:
        await asyncio.to_thread(database.stop)


@pytest.fixture
def marker() -> str:
    """A unique string for this test, to find its own requests in `model.find_requests(marker)`."""
    return f"m{uuid.uuid4().hex[:12]}"
