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
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Where local services keep their data, logs and pid files unless told otherwise.
DEFAULT_HOME = Path(".build")


class KafkaSettings(BaseModel):
    """The broker genmon talks to, and the single-node broker `genmon infra up` starts."""

    host: str = Field("127.0.0.1", description="address the local broker listens on")
    port: int = Field(19092, description="client (PLAINTEXT) port of the local broker")
    controller_port: int = Field(19093, description="KRaft controller port of the local broker")
    bootstrap_servers: str = Field("", description="defaults to host:port of the local broker")
    version: str = Field("3.9.1", description="Apache Kafka version resolved from Maven Central")
    heap: str = Field("512m", description="JVM heap of the local broker")
    partitions: int = Field(4, ge=1, description="partitions of each genmon topic")
    retention_ms: int = Field(7 * 24 * 3600 * 1000, description="retention of each genmon topic")
    topic_prefix: str = Field("genmon", description="topics are named <prefix>.<kind>")
    start_timeout_s: float = Field(90.0, description="how long `infra up` waits for the broker")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="how every genmon client talks to the broker"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism (SASL_* protocols); default PLAIN"
    )
    sasl_username: str | None = Field(None, description="SASL user name")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never printed)")
    ssl_cafile: Path | None = Field(
        None, description="CA certificate (PEM) that signed the broker's; unset: the system's"
    )
    ssl_certfile: Path | None = Field(None, description="client certificate (PEM), for mTLS")
    ssl_keyfile: Path | None = Field(None, description="client private key (PEM), for mTLS")
    ssl_key_password: SecretStr | None = Field(None, description="password of the client key")
    ssl_check_hostname: bool = Field(
        True, description="check that the broker's certificate names the host connected to"
    )
    replication_factor: int = Field(
        1, ge=1, description="replicas of every topic genmon creates (internal ones included)"
    )
    min_insync_replicas: int = Field(
        1, ge=1, description="min.insync.replicas of every topic genmon creates"
    )
    acks: Literal["all", "1", "0"] = Field(
        "all", description="producer acks of every genmon producer (the SDK's included)"
    )
    sasl_port: int = Field(
        19094,
        description="SASL_SSL port of the local broker (`genmon infra up --sasl`), with a CA "
        "the script generates",
    )

    @model_validator(mode="after")
    def _default_bootstrap(self) -> KafkaSettings:
        if not self.bootstrap_servers:
            self.bootstrap_servers = f"{self.host}:{self.port}"
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"kafka.min_insync_replicas ({self.min_insync_replicas}) cannot exceed "
                f"kafka.replication_factor ({self.replication_factor}): no write could succeed"
            )
        return self


class PostgresSettings(BaseModel):
    """The local PostgreSQL cluster `genmon infra up --postgres` starts on loopback."""

    host: str = Field("127.0.0.1", description="address the local cluster listens on")
    port: int = Field(55432, description="port of the local cluster")
    user: str = Field("genmon", description="role created for genmon")
    password: str = Field("genmon", description="password of that role (local cluster only)")
    database: str = Field("genmon", description="database created for genmon")
    start_timeout_s: float = Field(60.0, description="how long `infra up` waits for PostgreSQL")

    @property
    def url(self) -> str:
        return (
            f"postgresql+psycopg://{self.user}:{self.password}"
            f"@{self.host}:{self.port}/{self.database}"
        )


class DatabaseSettings(BaseModel):
    """Where incidents, notifications, retrain jobs and labelled examples are stored."""

    url: str = Field("sqlite:///.build/genmon.sqlite", description="SQLAlchemy URL")
    echo: bool = Field(False, description="log every SQL statement (debugging)")


class WorkerSettings(BaseModel):
    """The Faust worker (`genmon worker`)."""

    app_id: str = Field("genmon", description="Faust app id: consumer group and table names")
    web_port: int = Field(6066, description="Faust web server (also serves /metrics)")
    web_host: str = Field("127.0.0.1", description="address the Faust web server binds to")
    store: str = Field("memory://", description="Faust table store (memory:// or rocksdb://)")
    dlq_max_payload_bytes: int = Field(
        65536, description="original bytes kept in a dead-letter record"
    )
    batch_size: int = Field(1000, description="events taken per batch by stream agents")
    batch_within_s: float = Field(0.5, description="longest wait to fill a batch")
    loglevel: str = Field("info", description="worker log level")
    commit_every: int = Field(
        50_000,
        ge=1,
        description=(
            "events acknowledged between offset commits (there is also one every"
            " commit_interval_s); each commit first writes the pipeline's changed state, so a"
            " larger value writes it less often and a crash replays more events"
        ),
    )
    commit_interval_s: float = Field(
        2.8,
        gt=0,
        description="period of offset commits (Faust's broker_commit_interval); see commit_every",
    )
    session_timeout_s: float = Field(
        6.0,
        gt=0,
        description=(
            "a worker silent this long (killed, host lost) leaves the consumer group and the"
            " others take its partitions: they are read again ~2-3 s later (BENCHMARKS.md,"
            " Failover). The broker's group.min.session.timeout.ms (6 s by default) is the"
            " floor; a longer timeout rides out longer stalls but fails over that much later"
        ),
    )
    heartbeat_interval_s: float = Field(
        1.0,
        gt=0,
        description=(
            "how often a worker tells the broker it is alive, and so how soon the others"
            " learn of a rebalance (< session timeout)"
        ),
    )
    log_repeat_interval_s: float = Field(
        30.0,
        gt=0,
        description="a connection error logged again within this interval is counted, and the"
        " count logged once per interval instead of every line",
    )
    native_ingest: bool = Field(
        True,
        description=(
            "decode and aggregate inference batches, and keep feedback-join entries, with the"
            " compiled fast path (genmon.streams.native) when it is installed; same results,"
            " pydantic decides every message it does not accept"
        ),
    )
    record_signals: bool = Field(
        True,
        description=(
            "publish each judged window's summary and detector scores to <prefix>.signals and"
            " store them in table window_signal (the dashboard's and the API's charts); off:"
            " neither, detection unchanged"
        ),
    )

    @model_validator(mode="after")
    def _heartbeat_within_session(self) -> WorkerSettings:
        if self.heartbeat_interval_s >= self.session_timeout_s:
            raise ValueError(
                f"worker.heartbeat_interval_s ({self.heartbeat_interval_s}) must be below "
                f"worker.session_timeout_s ({self.session_timeout_s}); a third of it is usual"
            )
        return self


class SdkSettings(BaseModel):
    """Defaults of the producer SDK (`genmon.Monitor`)."""

    buffer_max_events: int = Field(100_000, description="events kept while the broker is down")
    linger_ms: int = Field(20, description="how long the producer waits to fill a batch")
    compression: str = Field("gzip", description="kafka-python compression_type")
    max_text_chars: int = Field(32_768, description="longer prompts/responses are cut to this")
    delivery_timeout_ms: int = Field(
        600_000, description="how long the producer retries an event it holds before failing it"
    )
    sequence_max_models: int = Field(
        10_000,
        ge=1,
        description=(
            "(topic, model) pairs whose genmon-seq counter a Monitor keeps; the least recently"
            " used beyond it restarts its count under a new genmon-producer id"
        ),
    )


class WindowSettings(BaseModel):
    """Windowed aggregates kept by the streaming pipeline."""

    tumbling_s: float = Field(60.0, description="size of tumbling windows (detectors run on these)")
    hopping_size_s: float = Field(300.0, description="size of hopping windows (dashboards)")
    hopping_step_s: float = Field(60.0, description="step between hopping windows")
    expires_s: float = Field(3600.0, description="closed window state is dropped after this")
    allowed_lateness_s: float = Field(
        10.0, description="a window closes when the watermark passes its end plus this"
    )
    idle_timeout_s: float = Field(
        5.0,
        description=(
            "a model without events this long, while its partition is caught up with a"
            " broker that answers, advances its watermark with the wall clock"
        ),
    )
    outage_grace_s: float = Field(
        15.0,
        ge=0,
        description=(
            "after the broker did not answer, idle watermarks wait this much longer, for"
            " producers to reconnect and deliver what they buffered"
        ),
    )
    close_interval_s: float = Field(1.0, description="period of the window-closing timer")
    max_future_skew_s: float = Field(
        300.0, description="events stamped further in the future are dropped (counted)"
    )
    sketch_relative_accuracy: float = Field(
        0.01, gt=0, lt=1, description="DDSketch relative accuracy of latency/TTFT quantiles"
    )
    max_segment_values: int = Field(
        100,
        ge=1,
        description=(
            "distinct values per model and segment attribute kept in live panes; further"
            " values are aggregated as `<attribute>=__other__` (counted, noted in the window)"
        ),
    )
    refusal_phrases_file: Path | None = Field(
        None, description="YAML refusal phrase list (default: genmon's refusal_phrases.yaml)"
    )


class FeedbackSettings(BaseModel):
    """Joining feedback to its inference."""

    join_ttl_s: float = Field(86_400.0, description="how long either side waits for the other")
    negative_score_below: float = Field(
        0.5, description="feedback scores below this count as negative"
    )
    join_max_text_chars: int = Field(
        8192, ge=0, description="prompt/response characters kept per inference for the join"
    )
    join_max_entries: int = Field(
        50_000,
        ge=1,
        description=(
            "most join entries a partition keeps; beyond it the soonest-expiring are evicted"
            " (their waiting feedback counts as orphaned). An entry holds up to"
            " 2 x join_max_text_chars characters plus ~1 KiB, and a chat's latest turns up to"
            " join_max_text_chars more: at most ~0.9 GB per partition at the defaults (ASCII"
            " text; ~1.3 GB for long chats), ~80 MB with 300-character prompts and responses"
        ),
    )
    examples_retry_initial_s: float = Field(
        0.5,
        gt=0,
        description=(
            "wait before labelled examples that met a transient database error (down,"
            " restarting, not migrated) are tried again; doubles with each failure"
        ),
    )
    examples_retry_max_s: float = Field(
        30.0, gt=0, description="longest wait between two tries of labelled examples"
    )
    examples_write_timeout_s: float = Field(
        10.0,
        gt=0,
        description=(
            "a batch's labelled examples not stored within this wait in the examples-retry"
            " topic instead, so a hung database never holds up the aggregates"
        ),
    )


EmbeddedField = Literal["prompt", "response"]
EMBEDDED_FIELDS: tuple[EmbeddedField, ...] = ("prompt", "response")


class EmbeddingSettings(BaseModel):
    """Sampling and encoding of texts for drift detection."""

    enabled: bool = Field(True, description="sample and embed texts for embedding drift")
    fields: list[EmbeddedField] = Field(
        default_factory=lambda: list(EMBEDDED_FIELDS), description="texts embedded per inference"
    )
    sample_rate: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description=(
            "share of texts sampled while the encoder keeps up (0.25: the detection"
            " benchmark's topic switches page a median 37 s after they begin, 82 s at 0.1)"
        ),
    )
    min_sample_rate: float = Field(
        0.005, ge=0.0, le=1.0, description="floor of the sample rate under encoder backlog"
    )
    reservoir_per_window: int = Field(
        512,
        ge=1,
        description=(
            "most sampled texts per model, version, field and window, spread over the"
            " window's sub-samples"
        ),
    )
    flush_interval_s: float = Field(
        5.0,
        gt=0,
        description=(
            "event time each sub-sample of sampled texts covers: embedding drift judges"
            " every one as it arrives (shorter: sooner, but more looks share the budget)"
        ),
    )
    batch_size: int = Field(64, ge=1, description="texts the encoder takes and encodes at once")
    batch_within_s: float = Field(1.0, gt=0, description="longest wait to fill an encoder batch")
    device: str = Field("cpu", description="cpu, cuda or auto")
    backend: str = Field(
        "auto", description="torch, onnx or auto (onnx int8 when it agrees with fp32)"
    )
    cache_dir: Path = Field(DEFAULT_HOME / "models", description="where exported ONNX models live")
    threads: int = Field(1, ge=1, description="torch/onnxruntime threads of the encoder process")
    max_text_chars: int = Field(
        2048, ge=1, description="texts are cut to this before sampling (the model reads 256 tokens)"
    )
    run_encoder: bool = Field(
        True,
        description="encode inside `genmon worker`; false: run `genmon worker --role embed`",
    )
    max_backlog: int = Field(
        2048, ge=1, description="texts waiting for the encoder above which the sample rate halves"
    )
    backlog_check_interval_s: float = Field(
        2.0, gt=0, description="how often the sampler reads the encoder's backlog"
    )
    group_timeout_s: float = Field(
        30.0, gt=0, description="a sub-sample missing texts this long is judged as it is"
    )

    @model_validator(mode="after")
    def _rates_in_order(self) -> EmbeddingSettings:
        if self.min_sample_rate > self.sample_rate:
            raise ValueError(
                f"embedding.min_sample_rate ({self.min_sample_rate}) is above "
                f"embedding.sample_rate ({self.sample_rate}); lower it"
            )
        return self


class DetectorSettings(BaseModel):
    """The default detectors: what a healthy model may cost in false pages, and how the
    model's own baselines are learned (see :mod:`genmon.detectors.calibration` and
    :mod:`genmon.streams.detection.runner`)."""

    false_pages_per_week: float = Field(
        1.0,
        gt=0,
        description=(
            "how often a healthy model may page: false pages per model per week, shared by"
            " the default detectors (`genmon detectors list` shows each one's share)"
        ),
    )
    config_file: Path | None = Field(
        None,
        description=(
            "YAML detector plan: per model glob, signals -> detectors -> params -> severity"
            " -> share of the budget (default: genmon's defaults.yaml; see `genmon detectors"
            " list`); a malformed file stops the worker at start with its file, line and field"
        ),
    )
    baseline_warmup_windows: int = Field(
        15,
        ge=2,
        description=(
            "tumbling windows a new model's baselines learn from before its detectors judge"
            " it (silent; a new version of a known model is judged from its first window)"
        ),
    )
    baseline_refresh_windows: int = Field(
        1440,
        ge=2,
        description=(
            "healthy windows a baseline collects before they may replace it; a young"
            " baseline grows by doubling until it holds this many, and a candidate worse"
            " than the baseline is refused, so a slow degradation is not learned away"
        ),
    )
    latency_quantile: float = Field(
        0.95,
        gt=0.5,
        lt=1.0,
        description=(
            "quantile of the baseline's per-request latencies (TTFT, time per output token,"
            " end-to-end); the latency tests count the requests above it"
        ),
    )
    rate_odds_ratio: float = Field(
        2.0,
        gt=1.0,
        description=(
            "smallest rise of a rate, as an odds ratio against its baseline, the sequential"
            " tests are designed to catch (error, refusal, empty, negative-feedback and"
            " latency-exceedance rates)"
        ),
    )
    rate_min_increase: float = Field(
        0.01,
        ge=0.0,
        lt=1.0,
        description=(
            "smallest absolute rise of an error, refusal, empty or negative-feedback rate"
            " worth a page"
        ),
    )
    drift_components: int = Field(
        16, ge=1, description="principal components the embedding drift test compares"
    )
    drift_reference_windows: int = Field(
        20,
        ge=2,
        description=(
            "windows of sampled embeddings (after the first 256 texts, which fix the"
            " principal components) that make an embedding drift reference"
        ),
    )
    min_segment_size: int = Field(
        1,
        ge=1,
        description=(
            "least scored feedback of a series in a window that is judged (the sequential"
            " test adds evidence over windows, so small windows count too)"
        ),
    )
    min_window_requests: int = Field(
        10, ge=1, description="windows with fewer requests are not judged by the runner"
    )
    early_interval_s: float = Field(
        1.0,
        ge=0.0,
        description=(
            "how often the rate and latency tests look at the open tumbling window, so a"
            " change is paged seconds after it starts instead of after the window closes"
            " (within the same false-alarm budget); 0 judges closed windows only"
        ),
    )
    slos: dict[str, list[str]] = Field(
        default_factory=dict,
        description=(
            "service-level objectives a user writes per model id ('*' for every model), e.g."
            ' {"support-bot": ["ttft_p95 <= 1.5s", "error_rate <= 2%"]}; a breached one'
            " pages whatever the baseline says; none by default"
        ),
    )
    exemplars_per_window: int = Field(
        32,
        ge=0,
        le=64,
        description=(
            "affected examples kept per window and signal (errors, refusals, empty, truncated,"
            " negative feedback) and clustered into a firing finding's evidence; 0 disables"
        ),
    )
    redact_exemplars: bool = Field(
        True,
        description=(
            "redact emails, phones, cards and API keys in affected examples' prompt, response"
            " and note when they are taken, before window records, findings and incidents"
            " store them"
        ),
    )
    series_ttl_s: float = Field(
        86_400.0,
        gt=0,
        description=(
            "a model's detector series (version, segment, signal; or version and field for"
            " embedding drift) not judged for this long in event time is dropped from its"
            " state; if it returns it starts fresh"
        ),
    )
    max_series_per_model: int = Field(
        1000,
        ge=1,
        description="detector series kept per model; beyond it the least recently judged go",
    )
    max_embedding_series_per_model: int = Field(
        20,
        ge=1,
        description=(
            "embedding drift series (version, field) kept per model, each up to 900 KB of"
            " state; beyond it the least recently sampled go"
        ),
    )

    @field_validator("slos")
    @classmethod
    def _slos_parse(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        # Read now, so a typo fails at start-up with what to write, not in the runner.
        from genmon.schemas.slos import parse_slo

        for texts in value.values():
            for text in texts:
                parse_slo(text)
        return value


class RunbookSettings(BaseModel):
    """Where an on-call engineer reads what to do about one kind of problem."""

    url: str | None = Field(None, description="runbook page linked from every notification")
    remediation: list[str] = Field(default_factory=list, description="ordered remediation steps")


class IncidentSettings(BaseModel):
    """Turning findings into incidents (see incidents/manager.py)."""

    run_in_worker: bool = Field(
        True,
        description=(
            "run the incident manager inside `genmon worker`; set false on every worker and"
            " run `genmon worker --role incidents` to give paging a process of its own"
        ),
    )
    auto_resolve_quiet_windows: int = Field(
        3, ge=1, description="clear windows in a row after which an open incident auto-resolves"
    )
    reopen_cooldown_s: float = Field(
        1800.0,
        ge=0,
        description=(
            "a resolved incident seen again within this reopens (same id, pages again) instead"
            " of opening a new one"
        ),
    )
    flap_max_reopens: int = Field(
        2, ge=0, description="reopens within the cool-down after which the incident is flapping"
    )
    group_window_s: float = Field(
        600.0,
        ge=0,
        description=(
            "incidents of one model opened within this are linked as related (each still pages"
            " on its own)"
        ),
    )
    severity_score_ratio_bands: dict[str, float] = Field(
        default_factory=lambda: {"warning": 1.0, "error": 2.0, "critical": 4.0},
        description="least score/threshold for each severity",
    )
    severity_effect_size_bands: dict[str, float] = Field(
        default_factory=lambda: {"warning": 0.2, "error": 0.5, "critical": 0.8},
        description="least |effect size| for each severity (Cohen's small/medium/large)",
    )
    batch_size: int = Field(
        200, ge=1, description="findings applied per database transaction by the agent"
    )
    batch_within_s: float = Field(
        0.05, gt=0, description="longest wait to fill a batch of findings (adds to page latency)"
    )
    chart_points: int = Field(100, ge=1, description="recent scores kept on each incident")
    evidence_max_bytes: int = Field(16_384, ge=256, description="largest evidence snapshot kept")
    finding_dedup_retention_s: float = Field(
        7 * 86_400.0, description="how long a finding's dedup key is kept (>= topic retention)"
    )
    runbooks: dict[str, RunbookSettings] = Field(
        default_factory=dict, description="runbook per detector name or finding kind"
    )
    publish_events: bool = Field(
        True,
        description=(
            "queue every transition (opened, escalated, acknowledged, resolved, reopened) in the"
            " outbox for the incidents topic; the notification dispatcher publishes it"
        ),
    )


class DestinationSettings(BaseModel):
    """One place notifications go to."""

    name: str = Field(description="unique name used by routes and shown in the outbox")
    type: Literal["webhook", "slack", "pagerduty", "alertmanager"] = "webhook"
    url: SecretStr = Field(description="endpoint; a secret because URLs often carry tokens")
    secret: SecretStr | None = Field(
        None,
        description="key that signs a webhook's deliveries (Standard Webhooks; whsec_<base64> or"
        " any string)",
    )
    routing_key: SecretStr | None = Field(None, description="PagerDuty Events API v2 key")
    heartbeat_url: SecretStr | None = Field(
        None,
        description="dead-man's-switch URL (a PagerDuty heartbeat, healthchecks.io, Cronitor...)"
        " pinged every notify.watchdog_interval_s while genmon runs",
    )
    watchdog: bool = Field(
        True,
        description="send this destination genmon's always-firing heartbeat (Alertmanager: the"
        " Watchdog alert; others: heartbeat_url when set)",
    )
    rate_per_s: float = Field(5.0, gt=0, description="most deliveries per second")
    burst: int = Field(10, ge=1, description="deliveries allowed at once before rate limiting")
    timeout_s: float | None = Field(None, description="defaults to notify.timeout_s")


class RouteSettings(BaseModel):
    """Which destinations get which incidents (first match wins unless ``continue_``)."""

    destinations: list[str]
    matchers: list[str] = Field(
        default_factory=list,
        description='Alertmanager-style label matchers, e.g. severity=~"error|critical"',
    )
    continue_: bool = Field(False, alias="continue", description="also try the next routes")
    runbook: RunbookSettings | None = Field(None, description="runbook added by this route")

    model_config = {"populate_by_name": True}


class NotifySettings(BaseModel):
    """Delivering notifications from the outbox."""

    destinations_file: Path | None = Field(None, description="YAML file of destinations/routes")
    destinations: list[DestinationSettings] = Field(
        default_factory=list, description="webhook/slack/pagerduty/alertmanager endpoints"
    )
    routes: list[RouteSettings] = Field(
        default_factory=list, description="empty: every destination gets every notification"
    )
    retry_horizon_s: float = Field(
        21600.0,
        gt=0,
        description="a notification undelivered this long is dead, and an incident says its "
        "destination is unreachable",
    )
    max_attempts: int | None = Field(
        None, ge=1, description="optional cap on tries of one notification; unset: retry_horizon_s"
    )
    pause_after_failures: int = Field(
        3,
        ge=1,
        description="failures in a row that pause a destination: the rest wait, one probe at "
        "a time goes out on the backoff schedule",
    )
    backoff_initial_s: float = Field(
        1.0, gt=0, description="first retry delay (doubles each time, with jitter)"
    )
    backoff_max_s: float = Field(300.0, gt=0, description="longest retry or probe delay")
    retry_after_max_s: float = Field(3600.0, description="longest Retry-After honoured")
    timeout_s: float = Field(10.0, gt=0, description="HTTP timeout of one delivery")
    watchdog_interval_s: float = Field(
        60.0,
        ge=0,
        description="period of genmon's heartbeat to destinations that take one, so they notice"
        " when genmon itself is down; 0: none",
    )
    signature_tolerance_s: int = Field(300, description="replay window receivers should allow")
    redact: bool = Field(True, description="redact emails, phones, cards, API keys in payloads")
    max_text_chars: int = Field(500, ge=1, description="texts in notifications are cut to this")
    poll_interval_s: float = Field(1.0, gt=0, description="how often the dispatcher polls")
    concurrency: int = Field(16, ge=1, description="deliveries in flight at once")
    lease_s: float = Field(60.0, description="a claimed notification is retried after this")
    run_in_worker: bool = Field(True, description="run the dispatcher inside `genmon worker`")


class RetrainSettings(BaseModel):
    """The feedback loop: retrain policy, job queue and artifacts (:mod:`genmon.retrain`)."""

    policy_file: Path | None = Field(
        None, description="YAML retrain policy; unset: the shipped default policy"
    )
    artifacts_uri: str = Field(
        str(DEFAULT_HOME / "artifacts"),
        description="where datasets, checkpoints and adapters go (a folder or an fsspec URL)",
    )
    lease_s: float = Field(60.0, gt=0, description="a claimed job is taken over after this")
    heartbeat_s: float = Field(10.0, gt=0, description="how often a worker renews its lease")
    poll_interval_s: float = Field(2.0, gt=0, description="how often an idle worker looks")
    max_attempts: int = Field(3, ge=1, description="claims of a job before it ends failed")
    volume_check_interval_s: float = Field(
        60.0, gt=0, description="how often data-volume triggers count new labelled examples"
    )
    device: str = Field("auto", description="auto (CUDA when present), cuda or cpu")
    redact: bool = Field(
        False,
        description="redact emails, phones, cards and keys in training data (genmon's redactor)",
    )
    max_examples_per_subject: int = Field(
        50,
        ge=1,
        description="most examples of each class one data subject gives a dataset, so that one "
        "user cannot steer the model",
    )
    backend: Literal["local", "ray", "kubernetes"] = Field(
        "local", description="where training runs: this worker, a Ray cluster or a Kubernetes Job"
    )
    gpus_per_job: float = Field(1.0, ge=0, description="GPUs a remote job asks for")
    launcher: Literal["python", "torchrun", "accelerate"] = Field(
        "python", description="how a job's training command starts (multi-GPU: torchrun)"
    )
    processes_per_job: int = Field(
        1, ge=1, description="training processes (GPUs) a torchrun or accelerate launch starts"
    )
    ray_address: str = Field(
        "http://127.0.0.1:8265", description="Ray Jobs API address (the dashboard's)"
    )
    kubernetes_namespace: str = Field("default", description="namespace of training Jobs")
    kubernetes_image: str = Field(
        "genmon:latest", description="container image with genmon[retrain] for training Jobs"
    )
    remote_poll_s: float = Field(
        10.0, gt=0, description="how often a worker checks a remote job's state"
    )
    remote_python: str = Field(
        "python", description="the Python a Ray or Kubernetes run starts (node, image)"
    )
    remote_env_vars: list[str] = Field(
        default_factory=list,
        description="names of environment variables a worker passes on, as it has them, to "
        "remote runs (besides the settings it spells out), e.g. HF_HOME",
    )
    kubernetes_secret: str | None = Field(
        "genmon-retrain",
        description="Secret whose keys become a training Job's environment (database URL, "
        "Kafka credentials as GENMON_* variables): never literal secrets in the manifest",
    )
    kubernetes_deadline_s: int = Field(
        86400, gt=0, description="a training Job running longer is stopped by Kubernetes"
    )
    kubernetes_ttl_s: int = Field(
        604800,
        ge=0,
        description="how long Kubernetes keeps an ended training Job (adoption looks it up)",
    )


class SchedulerSettings(BaseModel):
    """The one scheduler across processes (:mod:`genmon.scheduler`): it only enqueues work."""

    enabled: bool = Field(
        True, description="run the scheduler in `genmon worker --role retrain` (one leads)"
    )
    lease_s: float = Field(
        30.0, gt=0, description="a leader that has not renewed for this long is replaced"
    )
    misfire_grace_s: float = Field(
        3600.0, ge=0, description="a tick missed while no leader ran fires once if this recent"
    )
    timezone: str = Field("UTC", description="time zone of cron expressions")
    tick_s: float = Field(
        1.0, gt=0, description="how often the leader compares its clock with the schedules"
    )
    retention_cron: str | None = Field(
        "17 3 * * *", description="when retention runs (cron); unset: never by clock"
    )
    reference_refresh_cron: str | None = Field(
        None, description="when drift references are refreshed (cron); unset: never by clock"
    )
    digest_cron: str | None = Field(
        "0 8 * * *", description="when the daily digest goes out (cron); unset: no digest"
    )
    digest_destination: str | None = Field(
        None, description="destination name that receives the digest; unset: no digest"
    )


class RetentionSettings(BaseModel):
    """How long genmon keeps what it stores (days; unset: forever). Enforced by the
    scheduler; Kafka topics are bounded by ``kafka.retention_ms``."""

    labelled_examples_days: float | None = Field(180.0, gt=0, description="labelled examples")
    windows_days: float | None = Field(
        90.0,
        gt=0,
        description="window records: they live on Kafka topics, so "
        "kafka.retention_ms bounds them (retention warns when that is longer)",
    )
    findings_days: float | None = Field(90.0, gt=0, description="findings seen (dedup rows)")
    signals_days: float | None = Field(
        7.0,
        gt=0,
        description="window signals at window resolution (table window_signal); older ones "
        "are rolled up into hourly rows first",
    )
    signal_rollups_days: float | None = Field(
        400.0, gt=0, description="hourly rollups of window signals"
    )
    api_audit_days: float | None = Field(365.0, gt=0, description="the API's audit of writes")
    incidents_days: float | None = Field(
        365.0, gt=0, description="resolved incidents and their transitions"
    )
    notifications_days: float | None = Field(30.0, gt=0, description="delivered notifications")
    datasets_days: float | None = Field(
        180.0, gt=0, description="built datasets of jobs that ended (their files)"
    )
    artifacts_days: float | None = Field(
        365.0,
        gt=0,
        description="checkpoints and adapters of versions that serve nothing (never a "
        "version an alias points to)",
    )
    batch_size: int = Field(
        500,
        ge=1,
        le=10_000,
        description="rows deleted (or scanned for an erasure) per transaction: bounds memory "
        "and lock time",
    )


class ApiSettings(BaseModel):
    """``genmon api``: the HTTP API, HTTP and OTLP ingest, the dashboard, ``/metrics``."""

    host: str = Field("127.0.0.1", description="address the API and dashboard listen on")
    port: int = Field(8700, ge=1, le=65535, description="port of the API and dashboard")
    public_url: str = Field(
        "",
        description="how people reach the dashboard (links in pages and webhook payloads); "
        "defaults to http://host:port",
    )
    max_body_bytes: int = Field(
        5 * 1024 * 1024, ge=1024, description="larger request bodies are refused with 413"
    )
    max_batch_events: int = Field(
        1000, ge=1, description="events one ingest request may carry (more: 413)"
    )
    ingest_timeout_s: float = Field(
        10.0,
        gt=0,
        description="how long an ingest request waits for the broker to acknowledge its "
        "events before answering 503 (the events are then not accepted)",
    )
    live_poll_s: float = Field(
        1.0, gt=0, description="how often live pages (server-sent events) look for changes"
    )
    metrics_cache_s: float = Field(
        5.0, ge=0, description="how long /metrics reuses what it read from the database"
    )
    require_token_for_dashboard: bool = Field(
        True,
        description="the dashboard asks for a read token (kept in a cookie); false: open to "
        "anyone who reaches the port (a trusted network only)",
    )

    def link_base(self) -> str:
        """The dashboard's base URL, without a trailing slash."""
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    def incident_url(self, incident_id: str) -> str:
        """The dashboard page of an incident: every page and webhook payload links to it."""
        return f"{self.link_base()}/incidents/{incident_id}"


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
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)

    def topic(self, kind: str) -> str:
        """Name of genmon's topic for ``kind`` (inference, feedback, findings, ...)."""
        return f"{self.kafka.topic_prefix}.{kind}"


#: The topics genmon creates and uses.
TOPIC_KINDS = (
    "inference",
    "feedback",
    "findings",
    "incidents",
    "retrain",
    "models",
    "deadletter",
)
#: Topics genmon's workers write for each other (closed windows, embedding samples,
#: labelled examples waiting for the database). They are created with the others: a worker
#: that subscribes to a topic before it exists gets its partitions only at its next
#: metadata refresh, minutes later.
INTERNAL_TOPIC_KINDS = ("windows", "embed-requests", "examples-retry", "signals")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
