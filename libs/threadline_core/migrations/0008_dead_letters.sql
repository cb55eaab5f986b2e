-- Records a consumer could not handle because their data makes the handler fail the same way every time
-- (a data error, not an outage). Parked here with the error so the partition moves on; an operator reads,
-- fixes and replays them (scripts/dead_letters.py). The value is kept as the broker had it (bytea: it may
-- hold what jsonb refuses).
CREATE TABLE IF NOT EXISTS dead_letters (
    id bigserial PRIMARY KEY,
    consumer_group text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    record_offset bigint NOT NULL,
    record_key bytea,
    value bytea NOT NULL,
    event_id text,
    event_type text,
    error text NOT NULL,
    attempts integer NOT NULL,
    parked_at timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz,
    UNIQUE (consumer_group, topic, partition, record_offset)
);
