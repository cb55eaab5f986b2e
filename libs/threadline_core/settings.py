"""Settings every service shares; each service subclasses them in its own settings.py."""

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CoreSettings(BaseSettings):
    """Where the broker, the database and Qdrant are, and how the process logs and serves health."""

    model_config = SettingsConfigDict(env_prefix="THREADLINE_", extra="ignore")

    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/threadline",
        validation_alias=AliasChoices("DATABASE_URL", "THREADLINE_DATABASE_URL"),
    )
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "THREADLINE_KAFKA_BOOTSTRAP_SERVERS"),
    )
    qdrant_url: str = Field(default="", validation_alias=AliasChoices("QDRANT_URL", "THREADLINE_QDRANT_URL"))
    qdrant_path: str = ".threadline/qdrant"
    topic_partitions: int = 6
    topic_replication_factor: int = Field(default=1, ge=1)
    """Replicas of each topic the services create (a cluster of 3 brokers or more: 3, so that one broker lost
    loses nothing and `acks=all` still meets a `min.insync.replicas` of 2)."""
    kafka_fetch_max_wait_ms: int = 6
    """Fetch long-poll bound. tansu (local broker) answers at once when records are there; an empty fetch it
    holds for the whole bound (below 250 ms) and a record arriving meanwhile waits for the next fetch: a hop
    takes ~half the bound plus a round trip (measured p50: 3.2 ms with 1, 4.1 with 6, 6.8 with 20), but
    every fetch costs ~0.7 ms of client and ~0.6 ms of tansu CPU. On 2 cores 6 beat 2 (runs bench, 1 at a
    time: platform p50 29 vs 37 ms, 33 vs 47 ms CPU per run: less polling, less contention). Apache Kafka
    answers as soon as data arrives, so deployments set 500."""
    kafka_idle_fetch_max_wait_ms: int = 50
    """The fetch bound once a consumer saw no record for `kafka_idle_after_seconds`; in between it grows
    linearly with the quiet time (back to kafka_fetch_max_wait_ms at the next record). Every empty fetch
    costs ~0.7 ms of client and ~0.6 ms of tansu CPU here, so an idle service polls tansu ~20 times a
    second instead of ~250; a record after a quiet spell of q seconds waits about half the bound it meets
    more on average (tansu holds an empty fetch for its whole bound), i.e. ~1% of q."""
    kafka_idle_after_seconds: float = 2.0
    kafka_session_timeout_ms: int = Field(default=6000, ge=3000)
    """A consumer-group member that sent no heartbeat (every second) for this long is dropped and its partitions
    go to the others. tansu completes every rebalance (a member joining or leaving: a start, a deploy, a crash)
    only half of this after it began, and the whole group consumes nothing meanwhile; a killed member holds its
    partitions for all of it. 6000 is the least Apache Kafka accepts by default (`group.min.session.timeout.ms`):
    3 s per rebalance on tansu, a killed member replaced after ~9 s (aiokafka's 10000: 5 s and ~15 s)."""
    consumer_stall_seconds: float = Field(default=60.0, gt=0)
    """/readyz fails while one of the service's consumers holds a partition that no fetch has answered for this
    long since it was assigned (joining a group and the first fetch take seconds, not a minute)."""
    outbox_leader_stall_seconds: float = Field(default=10.0, gt=0)
    """An outbox relay leader that ran no statement for this long while an event as old waits to be published is
    frozen (SIGSTOP, a paused VM): its session keeps the relay lock, so another relay ends it and takes over."""
    db_pool_min_size: int = 2
    db_pool_max_size: int = 10
    log_level: str = "INFO"
    host: str = "127.0.0.1"
    port: int = 8080
    instance_id: str = ""
    shutdown_grace_seconds: float = 20.0
    event_retention_days: float = Field(default=30.0, gt=0)
    """Events (SSE resume, webhook replay) and consumers' idempotency claims are kept this long; keep it longer
    than the topics' retention (Kafka's default: 7 days): a claim forgotten earlier could let a record still in
    a topic be applied twice."""
    event_retention_interval_seconds: float = Field(default=600.0, gt=0)
    """How often each service tries a retention pass (one instance at a time prunes)."""
