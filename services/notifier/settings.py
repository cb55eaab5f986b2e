"""Settings of the notifier service."""

from pydantic import Field, field_validator

from threadline_core.settings import CoreSettings

DEFAULT_RETRY_SCHEDULE = "0,5,300,1800,7200,18000,36000,36000"


class NotifierSettings(CoreSettings):
    """Environment-driven configuration (prefix THREADLINE_)."""

    port: int = 9104
    webhook_retry_schedule: str = Field(
        default=DEFAULT_RETRY_SCHEDULE,
        description="Seconds to wait before each attempt (first = after the event), comma separated")
    webhook_retry_jitter: float = Field(default=0.1, ge=0, le=1, description="+/- fraction added to each delay")
    webhook_max_retry_after_seconds: float = 86400.0
    webhook_timeout_seconds: float = 15.0
    webhook_allowed_networks: str = Field(
        default="", description="CIDRs webhooks may reach although private/loopback (make run: loopback)")
    webhook_endpoint_concurrency: int = Field(default=16, ge=1, description="Requests in flight per endpoint")
    webhook_scheduler_interval_seconds: float = Field(default=1.0, gt=0)
    webhook_scheduler_batch: int = 200
    webhook_lease_seconds: float = 60.0
    webhook_disable_after_seconds: float = 5 * 86400.0
    webhook_response_excerpt_bytes: int = 1024
    webhook_retention_days: float = Field(default=30.0, gt=0, description="Finished deliveries kept in the log")
    webhook_endpoint_backlog: int = Field(default=500, description="Due retries held in memory per endpoint")
    webhook_catchup_grace_seconds: float = Field(
        default=30.0, gt=0, description="An event in the log this long with no delivery for an endpoint that wants it"
        " gets one from the catch-up (the broker lost it; the live path takes milliseconds)")
    webhook_catchup_interval_seconds: float = Field(default=10.0, gt=0, description="Catch-up passes this often")
    webhook_catchup_batch: int = Field(default=1000, ge=1, description="Events of the log checked per catch-up pass")
    webhook_commit_interval_seconds: float = Field(
        default=1.0, ge=0, description="Consumed offsets are committed at most this often (redelivery is harmless)")

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        delays = [item.strip() for item in value.split(",") if item.strip()]
        if not delays or any(float(d) < 0 for d in delays):
            raise ValueError("webhook_retry_schedule needs at least one non-negative number of seconds")
        return value

    def retry_schedule(self) -> tuple[float, ...]:
        """The delays as numbers."""
        return tuple(float(item) for item in self.webhook_retry_schedule.split(",") if item.strip())
