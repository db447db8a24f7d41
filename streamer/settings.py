"""One frozen settings tree, built once in the CLI and passed down.

Sources, strongest first: command-line flags, environment (STREAMER_<SECTION>__<FIELD>, e.g.
STREAMER_KAFKA__BOOTSTRAP_SERVERS), a TOML config file (--config / STREAMER_CONFIG), defaults.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from streamer.errors import StreamerError

ENV_PREFIX = "STREAMER_"
ENV_NESTED_DELIMITER = "__"


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(Section):
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]")
    input_topic: str = Field("sensor-readings", min_length=1, description="topic of readings (key = device id)")
    output_topic: str = Field("sensor-predictions", min_length=1, description="topic predictions are written to")
    dead_letter_topic: str = Field("sensor-dead-letters", min_length=1, description="topic for messages that cannot be used")
    group_id: str = Field("streamer", min_length=1, description="consumer group id")
    client_id: str = Field("streamer", min_length=1, description="client id shown by the broker")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where a group without committed offsets starts"
    )
    session_timeout_ms: Annotated[int, Field(ge=6000, le=300000)] = Field(
        10000, description="consumer session timeout"
    )
    startup_wait_s: Annotated[float, Field(ge=0)] = Field(
        120.0, description="how long start-up keeps trying to reach the brokers (0: give up at the first failure)"
    )
    exactly_once: bool = Field(
        False, description="commit predictions and input offsets in one Kafka transaction (read_committed downstream)"
    )
    assignment: Literal["auto", "cooperative-sticky", "range"] = Field(
        "auto",
        description="partition assignment: cooperative-sticky moves only what must move; range revokes all on "
        "every rebalance (auto: cooperative-sticky, range in exactly-once mode)",
    )
    instance_id: str | None = Field(
        None,
        description="stable name of this process (e.g. the pod's); exactly-once mode fences a crashed "
        "predecessor's open transaction by it (none: random)",
    )
    transactional_id_prefix: str = Field(
        "streamer", min_length=1, description="prefix of this process's transactional id (exactly-once mode)"
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="how clients talk to the brokers: plain or TLS, with or without SASL authentication"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (needed by SASL_PLAINTEXT and SASL_SSL)"
    )
    sasl_username: str | None = Field(None, description="SASL user name")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged or shown)")
    ssl_cafile: Path | None = Field(
        None, description="PEM file of the CA(s) that signed the brokers' certificates (none: the system's CAs)"
    )
    ssl_certfile: Path | None = Field(None, description="PEM client certificate chain, for brokers that ask for one")
    ssl_keyfile: Path | None = Field(None, description="PEM private key of the client certificate")
    ssl_password: SecretStr | None = Field(None, description="password of the encrypted ssl_keyfile (never logged or shown)")
    ssl_check_hostname: bool = Field(True, description="check that a broker's certificate names the host connected to")

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        for server in value.split(","):
            if not re.fullmatch(r"\[?[\w.\-:]+\]?:\d{1,5}", server.strip()):
                raise ValueError(f"{server!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _security_complete(self) -> "KafkaSettings":
        if self.security_protocol.startswith("SASL_"):
            missing = [name for name in ("sasl_mechanism", "sasl_username", "sasl_password") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"security_protocol {self.security_protocol} needs {', '.join(missing)}")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path}: no such file")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError(f"ssl_keyfile {self.ssl_keyfile} is given without ssl_certfile")
        return self

    # Defined after _security_complete so that it wraps it: errors raised there then record the
    # section's input with the secrets already masked (pydantic shows that input in its messages).
    @model_validator(mode="wrap")
    @classmethod
    def _mask_secret_input(cls, data: Any, handler: ModelWrapValidatorHandler["KafkaSettings"]) -> "KafkaSettings":
        if isinstance(data, dict):
            data = {
                key: SecretStr(value) if key in ("sasl_password", "ssl_password") and isinstance(value, str) else value
                for key, value in data.items()
            }
        return handler(data)


class BatchSettings(Section):
    max_records: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        4096, description="most readings in one micro-batch"
    )
    max_wait_ms: Annotated[int, Field(ge=0, le=60_000)] = Field(
        20, description="longest a micro-batch waits to fill once it has its first reading"
    )


class ModelSettings(Section):
    path: Path | None = Field(None, description="model file (torch.save of {config, state_dict, version})")
    device: str = Field("auto", description="torch device for state and steps: auto, cpu, cuda, cuda:N")
    reload_interval_s: Annotated[float, Field(ge=0)] = Field(
        10.0, description="seconds between checks of the model file for a new version (0: never)"
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
        return value


class StateSettings(Section):
    capacity: Annotated[int, Field(ge=1)] = Field(100_000, description="device rows preallocated in the state table")
    ttl_seconds: Annotated[float, Field(gt=0)] | None = Field(
        86400.0, description="evict devices idle this long (none: never)"
    )


class CheckpointSettings(Section):
    enabled: bool = Field(True, description="checkpoint device state per input partition")
    directory: Path = Field(
        Path("streamer-checkpoints"),
        description="where checkpoints are kept; a directory shared by several hosts lets them hand devices over",
    )
    interval_s: Annotated[float, Field(gt=0)] = Field(30.0, description="checkpoint a partition at least this often")
    interval_readings: Annotated[int, Field(ge=1)] = Field(
        100_000, description="checkpoint a partition after this many readings of it"
    )
    keep: Annotated[int, Field(ge=1, le=100)] = Field(3, description="checkpoints kept per partition")


class AnomalySettings(Section):
    """See streamer.anomaly for what each one does; its AnomalyParams has the same defaults."""

    threshold: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.9999, description="flag readings whose anomaly score (1 - tail probability) is at least this"
    )
    warmup: Annotated[int, Field(ge=0)] = Field(50, description="residuals a device needs before it is scored")
    short_alpha: Annotated[float, Field(gt=0, le=1)] = Field(
        0.3, description="weight of a new residual in the short-run mean"
    )
    long_alpha: Annotated[float, Field(gt=0, le=1)] = Field(
        0.001, description="weight of a new residual in the long-run residual mean and variance"
    )
    min_std: Annotated[float, Field(gt=0)] = Field(
        0.01, description="floor of the residuals' mean and spread (normalised units)"
    )
    adapt_after: Annotated[int, Field(ge=1)] = Field(
        100, description="readings in a row with tail probability < 0.001 before a device's statistics restart"
    )
    novelty_decay: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.995, description="per-reading shrink of a device's recent peak surprise; a reading scores only above it (0: off)"
    )


class MetricsSettings(Section):
    enabled: bool = Field(True, description="serve /metrics and /healthz over HTTP")
    host: str = Field("127.0.0.1", description="address the metrics server binds")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(9100, description="port of /metrics and /healthz (0: any free)")


class RunSettings(Section):
    duration_s: Annotated[float, Field(gt=0)] | None = Field(None, description="stop after this many seconds (none: run until stopped)")
    status_interval_s: Annotated[float, Field(ge=0)] = Field(
        5.0, description="seconds between status lines on stderr (0: none)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")


class Settings(BaseSettings):
    # hide_input_in_errors: a whole-tree error would otherwise carry every raw value, secrets too.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        frozen=True,
        extra="forbid",
        hide_input_in_errors=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    batch: BatchSettings = BatchSettings()
    model: ModelSettings = ModelSettings()
    state: StateSettings = StateSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    anomaly: AnomalySettings = AnomalySettings()
    metrics: MetricsSettings = MetricsSettings()
    run: RunSettings = RunSettings()

    @model_validator(mode="after")
    def _batch_fits_table(self) -> "Settings":
        if self.batch.max_records > self.state.capacity:
            raise ValueError(
                f"batch.max_records ({self.batch.max_records}) exceeds state.capacity ({self.state.capacity}):"
                " one batch's devices must fit in the table"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def env_name(section: str, name: str) -> str:
    return f"{ENV_PREFIX}{section}{ENV_NESTED_DELIMITER}{name}".upper()


def load_settings(overrides: dict[str, dict[str, object]] | None = None, config_file: Path | None = None) -> Settings:
    """Settings from flags (``overrides``, by section), env, then ``config_file`` (TOML)."""
    cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise StreamerError(f"config file {config_file}: no such file")
        cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": config_file}})
    return cls(**(overrides or {}))
