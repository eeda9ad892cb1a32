"""All of genmon's configuration: one pydantic-settings class with nested sections.

Every field can be set from the environment with the ``GENMON_`` prefix and ``__``
between a section and its field, for example ``GENMON_KAFKA__PORT=29092`` or
``GENMON_DATABASE__URL=postgresql+psycopg://genmon@127.0.0.1:55432/genmon``.

>>> from genmon.settings import Settings
>>> Settings().kafka.bootstrap_servers
'127.0.0.1:19092'
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Where local services keep their data, logs and pid files unless told otherwise.
DEFAULT_HOME = Path(".build")


class KafkaSettings(BaseModel):
    """The broker genmon talks to, and the single-node broker `genmon infra up` starts."""

    host: str = "127.0.0.1"
    port: int = 19092
    controller_port: int = 19093
    bootstrap_servers: str = Field("", description="defaults to host:port of the local broker")
    version: str = Field("3.9.1", description="Apache Kafka version resolved from Maven Central")
    heap: str = Field("512m", description="JVM heap of the local broker")
    partitions: int = Field(4, ge=1, description="partitions of each genmon topic")
    retention_ms: int = Field(7 * 24 * 3600 * 1000, description="retention of each genmon topic")
    topic_prefix: str = Field("genmon", description="topics are named <prefix>.<kind>")
    start_timeout_s: float = 90.0

    @model_validator(mode="after")
    def _default_bootstrap(self) -> KafkaSettings:
        if not self.bootstrap_servers:
            self.bootstrap_servers = f"{self.host}:{self.port}"
        return self


class PostgresSettings(BaseModel):
    """The local PostgreSQL cluster `genmon infra up --postgres` starts on loopback."""

    host: str = "127.0.0.1"
    port: int = 55432
    user: str = "genmon"
    password: str = "genmon"
    database: str = "genmon"
    start_timeout_s: float = 60.0

    @property
    def url(self) -> str:
        return (
            f"postgresql+psycopg://{self.user}:{self.password}"
            f"@{self.host}:{self.port}/{self.database}"
        )


class DatabaseSettings(BaseModel):
    """Where incidents, notifications, retrain jobs and labelled examples are stored."""

    url: str = Field("sqlite:///.build/genmon.sqlite", description="SQLAlchemy URL")
    echo: bool = False


class WorkerSettings(BaseModel):
    """The Faust worker (`genmon worker`)."""

    app_id: str = "genmon"
    web_port: int = Field(6066, description="Faust web server (also serves /metrics)")
    store: str = Field("memory://", description="Faust table store (memory:// or rocksdb://)")
    dlq_max_payload_bytes: int = Field(
        65536, description="original bytes kept in a dead-letter record"
    )
    batch_size: int = Field(1000, description="events taken per batch by stream agents")
    batch_within_s: float = Field(0.5, description="longest wait to fill a batch")
    loglevel: str = "info"


class SdkSettings(BaseModel):
    """Defaults of the producer SDK (`genmon.Monitor`)."""

    buffer_max_events: int = Field(100_000, description="events kept while the broker is down")
    linger_ms: int = 20
    compression: str = Field("gzip", description="kafka-python compression_type")
    max_text_chars: int = Field(32_768, description="longest prompt/response accepted")


class WindowSettings(BaseModel):
    """Windowed aggregates kept by the streaming pipeline."""

    tumbling_s: float = 60.0
    hopping_size_s: float = 300.0
    hopping_step_s: float = 60.0
    expires_s: float = 3600.0
    latency_reservoir: int = 1024
    slow_latency_ms: float = 2000.0


class FeedbackSettings(BaseModel):
    """Joining feedback to its inference."""

    join_ttl_s: float = Field(86_400.0, description="how long either side waits for the other")
    negative_score_below: float = 0.5


class EmbeddingSettings(BaseModel):
    """Sampling and encoding of texts for drift detection."""

    enabled: bool = True
    fields: list[str] = Field(default_factory=lambda: ["prompt", "response"])
    sample_rate: float = Field(0.1, ge=0.0, le=1.0)
    min_sample_rate: float = 0.005
    reservoir_per_window: int = 512
    batch_size: int = 64
    batch_within_s: float = 1.0
    device: str = Field("cpu", description="cpu, cuda or auto")
    backend: str = Field("auto", description="torch, onnx or auto (onnx int8 when it agrees)")
    cache_dir: Path = Field(DEFAULT_HOME / "models", description="where exported ONNX models live")


class DetectorSettings(BaseModel):
    """Defaults for the detectors the runner instantiates per model."""

    ert: float = Field(1000.0, description="expected run time between false alarms, in updates")
    drift_window: int = 64
    reference_size: int = 1000
    min_segment_size: int = 30
    fdr_alpha: float = 0.05


class IncidentSettings(BaseModel):
    """Turning findings into incidents."""

    auto_resolve_quiet_windows: int = 3
    reopen_cooldown_s: float = 1800.0
    group_window_s: float = 600.0


class NotifySettings(BaseModel):
    """Delivering notifications from the outbox."""

    destinations_file: Path | None = Field(None, description="YAML file of destinations/routes")
    max_attempts: int = 8
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    timeout_s: float = 10.0
    signature_tolerance_s: int = 300
    redact: bool = True
    max_text_chars: int = 500


class Settings(BaseSettings):
    """genmon's settings; see the README's configuration table for every field."""

    model_config = SettingsConfigDict(
        env_prefix="GENMON_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    home: Path = Field(DEFAULT_HOME, description="data, logs and pid files of local services")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    sdk: SdkSettings = Field(default_factory=SdkSettings)
    windows: WindowSettings = Field(default_factory=WindowSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    detectors: DetectorSettings = Field(default_factory=DetectorSettings)
    incidents: IncidentSettings = Field(default_factory=IncidentSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)

    def topic(self, kind: str) -> str:
        """Name of genmon's topic for ``kind`` (inference, feedback, findings, ...)."""
        return f"{self.kafka.topic_prefix}.{kind}"


#: The topics genmon creates and uses.
TOPIC_KINDS = ("inference", "feedback", "findings", "incidents", "retrain", "deadletter")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
