"""The local stack itself: broker, database, migrations, service processes and their lifecycle."""

import os
import signal
import sys
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from threadline_core.db import migration_files
from threadline_core.kafka import create_producer, ensure_topics
from threadline_core.topics import ALL_TOPICS
from threadline_devstack._proc import free_port, run_async, wait_until
from threadline_devstack.broker import TansuBroker
from threadline_devstack.postgres import ExternalPostgres
from threadline_devstack.sql import Db
from threadline_devstack.stack import SERVICES, ServiceProcess, Stack, StackConfig, StackError


def _ready(port: int) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/readyz", trust_env=False, timeout=5).status_code


def test_every_service_is_running_and_ready(stack: Stack) -> None:
    assert set(SERVICES) <= set(stack.services)
    for proc in stack.services.values():  # extra instances that other tests started (and stopped) aside
        assert proc.running(), proc.log_tail()
        for port in proc.ready_ports:
            assert _ready(port) == 200, proc.log_tail()
    assert stack.base_url == f"http://127.0.0.1:{stack.gateway.port}/v1"


def test_services_get_the_stack_configuration(stack: Stack) -> None:
    env = stack.service("run_orchestrator").env
    assert env["DATABASE_URL"] == stack.database_url
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == stack.kafka_bootstrap_servers
    assert env["THREADLINE_MODEL_BASE_URL"] == stack.model_base_url
    assert env["THREADLINE_API_KEY"] == stack.api_key
    assert env["THREADLINE_PORT"] == str(stack.service("run_orchestrator").port)
    assert stack.model is not None and stack.model_base_url == stack.model.base_url


def test_migrations_are_applied(db: Db) -> None:
    applied = [r["version"] for r in db.fetch("SELECT version FROM schema_migrations ORDER BY version")]
    assert applied == [version for version, _ in migration_files()]
    assert db.fetchval("SELECT count(*) FROM information_schema.tables WHERE table_name = 'runs'") == 1


async def test_topics_exist_and_broker_round_trip(stack: Stack) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap_servers)
    await admin.start()
    try:
        assert set(ALL_TOPICS) <= set(await admin.list_topics())
    finally:
        await admin.close()
    topic = f"devstack.test.{uuid.uuid4().hex[:8]}"
    await ensure_topics(stack.kafka_bootstrap_servers, [topic], 1)
    payload = f"devstack-{uuid.uuid4().hex}".encode()
    producer = create_producer(stack.kafka_bootstrap_servers)
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, b"not-an-envelope:" + payload, key=b"devstack-test")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap_servers, group_id=None,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        from aiokafka import TopicPartition

        tp = TopicPartition(topic, sent.partition)
        consumer.assign([tp])
        consumer.seek(tp, sent.offset)
        batch = await consumer.getmany(tp, timeout_ms=10000)
        values = [r.value for r in batch.get(tp, [])]
        assert b"not-an-envelope:" + payload in values
    finally:
        await consumer.stop()


async def test_fresh_database_on_a_given_server_is_created_and_dropped(stack: Stack) -> None:
    admin_dsn = stack.database_url.rsplit("/", 1)[0] + "/postgres"
    fresh = ExternalPostgres(admin_dsn, fresh_database=True)
    fresh.start()
    name = fresh.dsn.rsplit("/", 1)[1]
    assert name.startswith("threadline_test_")
    conn = await asyncpg.connect(fresh.dsn)
    assert await conn.fetchval("SELECT current_database()") == name
    fresh.stop()  # drops it even with our connection still open (WITH FORCE)
    await conn.close()
    check = await asyncpg.connect(admin_dsn)
    try:
        assert await check.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 0
    finally:
        await check.close()


def test_an_extra_instance_runs_on_its_own_port(stack: Stack) -> None:
    extra = stack.start_extra("run_orchestrator")
    try:
        main = stack.service("run_orchestrator")
        assert extra.port != main.port and extra.name.startswith("run_orchestrator-") and extra.name != main.name
        assert extra.env["THREADLINE_INSTANCE_ID"] != main.env["THREADLINE_INSTANCE_ID"]
        assert _ready(extra.port) == 200
    finally:
        assert extra.stop() == 0, extra.log_tail()
    assert main.running()
    assert _group_states(stack, "run-orchestrator") == ["Stable"]  # stop() returned once the rest rebalanced


def test_an_instance_is_ready_only_once_its_consumers_joined_their_group(stack: Stack) -> None:
    """A new instance (a rolling restart) answers /readyz at once, 503 with `consumers_joined` false while its group
    consumer joins (seconds on tansu), and 200 once the group assigned it its share: until then it consumes nothing."""
    extra = stack.start_extra("run_orchestrator", wait=False)
    answers: list[tuple[int, object]] = []
    try:
        def answered_ready() -> bool:
            try:
                response = httpx.get(f"http://127.0.0.1:{extra.port}/readyz", trust_env=False, timeout=5)
            except httpx.HTTPError:
                return False
            answers.append((response.status_code, response.json()["checks"].get("consumers_joined")))
            return response.status_code == 200
        assert wait_until(answered_ready, timeout=120, interval=0.05, alive=extra.running), extra.log_tail()
        assert answers[0] == (503, False), answers  # served during the join, saying what it waits for
        assert answers[-1] == (200, True), answers
    finally:
        assert extra.stop() == 0, extra.log_tail()


def _group_states(stack: Stack, group: str) -> list[str]:
    async def describe() -> list[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap_servers)
        await admin.start()
        try:
            return [g[2] for response in await admin.describe_consumer_groups([group]) for g in response.groups]
        finally:
            await admin.close()
    return run_async(describe())


def _sleeper(tmp_path: Path, code: str = "import time; time.sleep(60)") -> ServiceProcess:
    return ServiceProcess(name="sleeper", command=[sys.executable, "-c", code], env=dict(os.environ),
                          port=free_port(), log_path=tmp_path / "sleeper.log")


@pytest.mark.unit
def test_service_process_kill_and_stop(tmp_path: Path) -> None:
    proc = _sleeper(tmp_path)
    proc.start(wait=False)
    assert proc.running()
    assert proc.kill() == -signal.SIGKILL
    assert not proc.running()
    proc.start(wait=False)
    first = proc.pid
    proc.restart(wait=False)
    assert proc.running() and proc.pid != first
    assert proc.stop(timeout=5) == -signal.SIGTERM
    assert "starting sleeper" in proc.log_tail()


@pytest.mark.unit
def test_service_process_that_exits_early_reports_its_log(tmp_path: Path) -> None:
    proc = _sleeper(tmp_path, "import sys; print('boom: missing setting', flush=True); sys.exit(3)")
    with pytest.raises(StackError, match="exited with code 3") as caught:
        proc.start(timeout=10)
    assert "boom: missing setting" in str(caught.value)


@pytest.mark.unit
def test_service_process_not_ready_in_time(tmp_path: Path) -> None:
    proc = _sleeper(tmp_path)
    try:
        with pytest.raises(StackError, match="not ready after"):
            proc.start(timeout=0.5)
    finally:
        proc.kill()


def test_a_dead_local_broker_is_started_again_on_its_port_with_the_topics(tmp_path: Path) -> None:
    """`make run`'s supervisor revives a tansu that died (its services reconnect to the same address)."""
    stack = Stack(StackConfig.from_env("test", environ={}, state_dir=tmp_path, logs_dir=tmp_path))
    stack.broker = TansuBroker(log_path=tmp_path / "broker.log")
    stack.broker.start()
    stack.kafka_bootstrap_servers = stack.broker.bootstrap_servers
    try:
        port = stack.broker.port
        assert not stack.revive_broker()
        assert stack.broker.pid is not None
        os.kill(stack.broker.pid, signal.SIGKILL)
        assert wait_until(lambda: stack.broker is not None and not stack.broker.running(), timeout=5)
        assert stack.revive_broker()
        assert stack.broker.running() and stack.broker.port == port
        assert set(ALL_TOPICS) <= run_async(_topics(stack.kafka_bootstrap_servers))
    finally:
        stack.broker.stop()


async def _topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()
