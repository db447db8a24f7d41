"""One frozen settings tree, built once in the CLI and passed down.

Sources, strongest first: command-line flags, environment (STREAMER_<SECTION>__<FIELD>, e.g.
STREAMER_KAFKA__BOOTSTRAP_SERVERS), a TOML config file (--config / STREAMER_CONFIG), defaults.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from streamer.errors import StreamerError, not_a_file
from streamer.malloc import check_keep_mb

ENV_PREFIX = "STREAMER_"
ENV_NESTED_DELIMITER = "__"
CONFIG_ENV = "STREAMER_CONFIG"
SECRET_SETTINGS = frozenset({"sasl_password", "ssl_password"})  # never shown, whatever their value's type
# Kafka's rule for topic names (kafka.common.internals.Topic): 1-249 of these characters, not "." or "..".
TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
# Variables Kubernetes sets for a Service named "streamer" (service links): not ours, never warned about.
KUBERNETES_SERVICE_ENV = re.compile(r"STREAMER_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)")


NONE_WORDS = frozenset({"none", "null"})
INT16_MAX, INT32_MAX = 2**15 - 1, 2**31 - 1  # Kafka's replication factor and partition counts on the wire
READINGS_COUNTED = 2**24  # a device's readings are counted in float32, exact up to here
MAX_DEVICES = 2**31 - 1  # rows of one state table: far beyond any machine's memory, within torch's sizes


def check_device_name(value: str) -> str:
    """``value`` if it names a device streamer runs on: auto, cpu, cuda or cuda:N (N at most
    127: torch keeps a device's index in 8 bits, and cuda:128 would be cuda:-128); ValueError
    otherwise."""
    match = re.fullmatch(r"auto|cpu|cuda(?::(\d{1,3}))?", value)
    if match is None or (match.group(1) is not None and int(match.group(1)) > 127):
        raise ValueError(f"{value!r} is not one of auto, cpu, cuda, cuda:N (N from 0 to 127)")
    return value


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_stand_ins(cls, value: Any, info: ValidationInfo) -> Any:
        """A TOML or JSON true/false where a number is wanted, a number where true/false is, and
        an empty path, are refused: pydantic's lax mode had read true as 1 (`capacity = true`: a
        table of one row), 1 as true, and "" as the current directory."""
        annotation = cls.model_fields[info.field_name].annotation
        wanted = set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}
        wanted = {get_args(t)[0] if get_origin(t) is Annotated else t for t in wanted}
        if isinstance(value, bool) and bool not in wanted and wanted & {int, float}:
            raise ValueError(f"{str(value).lower()} is no number")
        if type(value) in (int, float) and bool in wanted and not wanted & {int, float}:
            raise ValueError(f"{value} is neither true nor false")
        if Path in wanted and isinstance(value, str) and not value.strip():
            raise ValueError("an empty path")
        if Path in wanted and isinstance(value, str) and "\x00" in value:  # TOML's or JSON's \u0000
            raise ValueError("a NUL character in a path")
        return value

    @model_validator(mode="before")
    @classmethod
    def _none_words(cls, data: Any) -> Any:
        """"none" (or "null") from a flag, a variable or TOML is None where a setting allows it."""
        if not isinstance(data, Mapping):
            return data
        return {
            name: None
            if isinstance(value, str) and value.lower() in NONE_WORDS
            and name in cls.model_fields and _allows_none(cls.model_fields[name].annotation)
            else value
            for name, value in data.items()
        }


def _tls_reason(exc: Exception) -> str:
    """OpenSSL's reason in a few words ("PEM lib", "KEY_VALUES_MISMATCH"), or a file error's."""
    if isinstance(exc, ssl.SSLError):
        return getattr(exc, "reason", None) or str(exc)
    return getattr(exc, "strerror", None) or str(exc)


def _allows_none(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, UnionType) and type(None) in get_args(annotation)


def _topic_name(value: str) -> str:
    if not TOPIC_NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError("not a Kafka topic name (1-249 characters of a-z A-Z 0-9 . _ -, not '.' or '..')")
    return value


class KafkaSettings(Section):
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]")
    input_topic: str = Field("sensor-readings", min_length=1, description="topic of readings (key = device id)")
    output_topic: str = Field("sensor-predictions", min_length=1, description="topic predictions are written to")
    dead_letter_topic: str = Field("sensor-dead-letters", min_length=1, description="topic for messages that cannot be used")
    group_id: str = Field("streamer", min_length=1, description="consumer group id")
    client_id: str = Field("streamer", min_length=1, description="client id shown by the broker")
    client: Literal["confluent-kafka", "kafka-python"] = Field(
        "confluent-kafka",
        description="Kafka client library: confluent-kafka (librdkafka; faster, see README) or kafka-python",
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where a group without committed offsets starts"
    )
    session_timeout_ms: Annotated[int, Field(ge=6000, le=300000)] = Field(
        10000, description="consumer session timeout"
    )
    startup_wait_s: Annotated[float, Field(ge=0, le=604_800)] = Field(
        120.0, description="how long start-up keeps trying to reach the brokers, and then waits for the input topic to"
        " exist (0: give up at the first failure; at most a week, whose milliseconds librdkafka's timeouts still hold)"
    )
    exactly_once: bool = Field(
        False, description="commit predictions and input offsets in one Kafka transaction (read_committed downstream)"
    )
    batch_output: Literal["json", "arrow"] = Field(
        "json", description="predictions of readings that came in a batch message: json (a message per prediction,"
        " keyed by device, as for JSON readings) or arrow (batch messages keyed by the input message's key, with"
        " its content-type header; see README, Topics and messages)"
    )
    commit_interval_ms: Annotated[int, Field(ge=0, le=600_000)] = Field(
        1000, description="at-least-once: acknowledged batches' offsets are committed together at most this often"
        " while the loop is busy (at once when it goes idle, a checkpoint is due, partitions move or it stops);"
        " a crash re-publishes up to this much. 0: after every batch. Each commit is a broker round trip"
        " (about 5 ms on Kafka 4's group coordinator) in the loop's path"
    )
    max_message_bytes: Annotated[int, Field(ge=1024, le=1_000_000_000)] = Field(
        16 * 1024 * 1024, description="largest message the producer sends: a dead letter carries the whole"
        " input message, so keep it above the input topic's max.message.bytes (the output topics must accept it too)"
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
            # A name or IPv4 address, or an IPv6 address in brackets, then the port.
            match = re.fullmatch(r"(?:\[[0-9A-Fa-f:.]+\]|[\w.\-]+):(\d{1,5})", server.strip())
            if not match:
                raise ValueError(f"{server!r} is not host:port")
            if not 0 < int(match.group(1)) < 65536:
                raise ValueError(f"{server!r}: port {int(match.group(1))} is not from 1 to 65535")
        return value

    @field_validator("input_topic", "output_topic", "dead_letter_topic")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        return _topic_name(value)

    @model_validator(mode="after")
    def _topics_apart(self) -> "KafkaSettings":
        # The service would read its own output back: each prediction (or dead letter) a new bad reading.
        for name in ("output_topic", "dead_letter_topic"):
            if getattr(self, name) == self.input_topic:
                raise ValueError(
                    f"{describe_setting('kafka', name)} is the input topic "
                    f"{self.input_topic!r}: streamer would consume what it writes"
                )
        if self.dead_letter_topic == self.output_topic:
            raise ValueError(
                f"{describe_setting('kafka', 'dead_letter_topic')} is the output topic {self.output_topic!r}:"
                " dead letters would reach the predictions' readers"
            )
        return self

    @model_validator(mode="after")
    def _security_complete(self) -> "KafkaSettings":
        if self.security_protocol.startswith("SASL_"):
            missing = [name for name in ("sasl_mechanism", "sasl_username", "sasl_password") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"kafka.security_protocol {self.security_protocol} needs {', '.join('kafka.' + m for m in missing)}")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path}: {not_a_file(path)}")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError(f"ssl_keyfile {self.ssl_keyfile} is given without ssl_certfile")
        if self.security_protocol in ("SSL", "SASL_SSL"):
            self._tls_files_load()
        return self

    def _tls_files_load(self) -> None:
        """The TLS files loaded here as the clients will load them, so that a mistake in them is
        one line naming the setting before any connection, not a TLS failure retried for
        startup_wait_s. An encrypted key is read with ssl_password, and refused without one: never
        by OpenSSL's prompt, which had stopped the process on a terminal."""
        context = ssl.create_default_context()
        if self.ssl_cafile is not None:
            try:
                context.load_verify_locations(cafile=str(self.ssl_cafile))
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"ssl_cafile {self.ssl_cafile} cannot be read as PEM certificates ({_tls_reason(exc)})")
        if self.ssl_certfile is not None:
            asked: list[bool] = []

            def password() -> bytes:  # asked only for an encrypted key
                asked.append(True)
                if self.ssl_password is None:  # not even an empty one: the clients would prompt for it
                    raise ValueError("no ssl_password")
                return self.ssl_password.get_secret_value().encode("utf-8", "surrogateescape")

            try:
                context.load_cert_chain(str(self.ssl_certfile), None if self.ssl_keyfile is None else str(self.ssl_keyfile),
                                        password=password)
            except (ssl.SSLError, OSError, ValueError) as exc:
                key = self.ssl_keyfile or self.ssl_certfile
                reason = "encrypted" if isinstance(exc, ValueError) else _tls_reason(exc)
                hint = ("" if not asked else "; if the key is encrypted, ssl_password must be its password"
                        if self.ssl_password is not None else "; an encrypted key needs ssl_password")
                raise ValueError(f"ssl_certfile {self.ssl_certfile} with its key {key} cannot be loaded ({reason}{hint})")

    # Defined after _security_complete so that it wraps it: errors raised there then record the
    # section's input with the secrets already masked (pydantic shows that input in its messages).
    @model_validator(mode="wrap")
    @classmethod
    def _mask_secret_input(cls, data: Any, handler: ModelWrapValidatorHandler["KafkaSettings"]) -> "KafkaSettings":
        if isinstance(data, dict):
            data = {
                key: SecretStr(value) if key in SECRET_SETTINGS and isinstance(value, str) else value
                for key, value in data.items()
            }
        return handler(data)


class BatchSettings(Section):
    max_records: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        4096, description="most messages in one micro-batch (a batch message is one, however many readings it has)"
    )
    max_wait_ms: Annotated[int, Field(ge=0, le=60_000)] = Field(
        0, description="longest a micro-batch waits to fill once it has its first message (0: it takes what the"
        " client has fetched; a loop that falls behind gets bigger batches by itself, and a wait adds to latency)"
    )


class ModelSettings(Section):
    path: Path | None = Field(None, description="model file (torch.save of {config, state_dict, version})")
    device: str = Field("auto", description="torch device for state and steps: auto, cpu, cuda, cuda:N")
    reload_interval_s: Annotated[float, Field(ge=0)] = Field(
        10.0, description="seconds between checks of the model file for a new version (0: never)"
    )
    cpu_threads: Annotated[int, Field(ge=0, le=1024)] = Field(
        1, description="torch threads for steps on the CPU (0: torch's default, one per core); 1 leaves the"
        " other cores to the Kafka client, and idle OpenMP threads spinning after a step slow the loop"
    )
    cuda_graphs: bool = Field(
        True, description="on CUDA, replay the step of waves up to 16384 readings from CUDA graphs, padded to"
        " power-of-two buckets (one launch instead of dozens for small batches)"
    )
    compile: bool = Field(
        False, description="on the CPU, step through code compiled by torch.compile (Inductor: a C++ compiler on"
        " the PATH, seconds at start-up, cached on disk): 1.0-1.35x (float32 state) to 1.55-1.7x (bfloat16) the"
        " eager step on a 2-core host; on CUDA the fused kernel runs regardless"
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        return check_device_name(value)


class StateSettings(Section):
    capacity: Annotated[int, Field(ge=1, le=MAX_DEVICES)] = Field(
        100_000, description="device rows preallocated in the state table"
    )
    ttl_seconds: Annotated[float, Field(gt=0)] | None = Field(
        86400.0, description="evict devices idle this long (none: never)"
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of each device's LSTM h and c (bfloat16: half the bytes, gate maths in float32)"
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
    store: Literal["directory", "kafka"] = Field(
        "directory",
        description="directory: files under checkpoint.directory; kafka: a compacted changelog topic (checkpoint.topic), "
        "so hosts share nothing but the brokers",
    )
    topic: str = Field("streamer-checkpoints", min_length=1, description="changelog topic of checkpoint.store = kafka")
    chunk_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = Field(
        512 * 1024, description="largest record value of the changelog (keep it under the broker's message.max.bytes)"
    )

    @field_validator("topic")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        return _topic_name(value)


class TopicsSettings(Section):
    """What `streamer topics create` gives the topics, and `streamer run` the ones it creates when missing."""

    partitions: Annotated[int, Field(ge=1, le=INT32_MAX)] = Field(
        6, description="partitions of the input and output topics (the most hosts that share the work)"
    )
    replication_factor: Annotated[int, Field(ge=1, le=INT16_MAX)] = Field(1, description="replicas of every topic streamer creates")
    retention_ms: Annotated[int, Field(ge=-1, le=2**63 - 1)] | None = Field(
        None, description="retention.ms of the input and output topics (-1: forever; none: the broker's default)"
    )
    dead_letter_partitions: Annotated[int, Field(ge=1, le=INT32_MAX)] = Field(1, description="partitions of the dead-letter topic")
    dead_letter_retention_ms: Annotated[int, Field(ge=-1, le=2**63 - 1)] | None = Field(
        None, description="retention.ms of the dead-letter topic (-1: forever; none: the broker's default)"
    )
    checkpoint_partitions: Annotated[int, Field(ge=1, le=INT32_MAX)] = Field(
        6, description="partitions of the checkpoint changelog (cleanup.policy=compact); an input partition's "
        "checkpoints go to one of them by hash"
    )


class AnomalySettings(Section):
    """See streamer.anomaly for what each one does; its AnomalyParams has the same defaults."""

    threshold: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.9999, description="flag readings whose anomaly score (1 - tail probability) is at least this"
    )
    warmup: Annotated[int, Field(ge=0, le=READINGS_COUNTED)] = Field(50, description="residuals a device needs before it is scored")
    short_alpha: Annotated[float, Field(gt=0, le=1)] = Field(
        0.3, description="weight of a new residual in the short-run mean"
    )
    long_alpha: Annotated[float, Field(gt=0, le=1)] = Field(
        0.001, description="weight of a new residual in the long-run residual mean and variance"
    )
    min_std: Annotated[float, Field(gt=0, le=1e6)] = Field(
        0.01, description="floor of the residuals' mean and spread (normalised units)"
    )
    adapt_after: Annotated[int, Field(ge=1, le=READINGS_COUNTED)] = Field(
        100, description="readings in a row with tail probability < 0.001 before a device's statistics restart"
    )
    novelty_decay: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.995, description="per-reading shrink of a device's recent peak surprise; a reading scores only above it (0: off)"
    )
    range_tolerance: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = Field(
        0.05,
        description="a reading beyond the device's range of values by more than this fraction of it scores at "
        "least 0.99999 (none: off)",
    )
    flat_runs: bool = Field(
        True, description="a run of identical readings longer than any the device finished scores at least 0.99999"
    )


class MetricsSettings(Section):
    enabled: bool = Field(True, description="serve /metrics and /healthz over HTTP")
    host: str = Field("127.0.0.1", description="address the metrics server binds")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(9100, description="port of /metrics and /healthz (0: any free)")
    event_time_future_s: Annotated[float, Field(ge=0)] = Field(
        300.0,
        description="event times more than this far ahead are counted in streamer_event_time_skew_total"
        " and kept out of the latency histogram",
    )
    event_time_past_s: Annotated[float, Field(gt=0)] = Field(
        604800.0,
        description="event times older than this are counted in streamer_event_time_skew_total"
        " and kept out of the latency histogram",
    )


class RunSettings(Section):
    duration_s: Annotated[float, Field(gt=0)] | None = Field(None, description="stop after this many seconds (none: run until stopped)")
    status_interval_s: Annotated[float, Field(ge=0)] = Field(
        5.0, description="seconds between status lines on stderr (0: none)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per record; json: one JSON object per line, with context fields"
    )
    malloc_keep_mb: int = Field(
        256, description="MiB of free memory a heap keeps for the next batch's tensors rather than giving it"
        " back to the OS (glibc's malloc; blocks up to 32 MiB come from the heap): 0 (glibc's defaults) or 64-2047."
        " Given back, a burst faults it in again: hundreds to thousands of page faults in a step"
    )

    @field_validator("malloc_keep_mb")
    @classmethod
    def _keep_mb(cls, value: int) -> int:
        return check_keep_mb(value)


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
    topics: TopicsSettings = TopicsSettings()
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

    @model_validator(mode="after")
    def _changelog_apart(self) -> "Settings":
        kafka = self.kafka
        if self.checkpoint.store == "kafka" and self.checkpoint.topic in (
            kafka.input_topic, kafka.output_topic, kafka.dead_letter_topic
        ):
            raise ValueError(
                f"{describe_setting('checkpoint', 'topic')} = {self.checkpoint.topic!r} is also a kafka topic of "
                "readings, predictions or dead letters: the checkpoint changelog needs its own topic"
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
        return init_settings, _KnownSettingsOnly(settings_cls, env_settings), TomlConfigSettingsSource(settings_cls)


class _KnownSettingsOnly(PydanticBaseSettingsSource):
    """The environment's settings without names that are not settings (``unknown_env_vars`` warns
    of those): a stray STREAMER_KAFKA__TYPO is ignored like STREAMER_KAFAK__TYPO, not refused."""

    def __init__(self, settings_cls: type[BaseSettings], source: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._source = source

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ asks the wrapped source

    def __call__(self) -> dict[str, Any]:
        known = setting_names()
        environ = {name.upper() for name in os.environ}

        def dropped(section: str, key: str) -> bool:
            # Only keys of STREAMER_<SECTION>__<KEY> variables (or deeper: STREAMER_KAFKA__SSL__X);
            # a key inside STREAMER_<SECTION>='{json}' is refused.
            name = env_name(section, key)
            return name in environ or any(var.startswith(name + ENV_NESTED_DELIMITER) for var in environ)

        def kept(section: str, values: dict[str, Any]) -> dict[str, Any]:
            out = {}
            for key, value in values.items():
                if (section, key) not in known:
                    if not dropped(section, key):
                        out[key] = value
                elif isinstance(value, dict) and env_name(section, key) not in environ:
                    # Only variables below the setting (STREAMER_KAFKA__SSL_CAFILE__X, read as
                    # {"x": ...}): no setting, warned of and ignored; they had reached the setting
                    # as its value, in place of one the section's JSON variable may give.
                    given = _section_json(section)
                    if key in given:
                        out[key] = given[key]
                else:
                    out[key] = value
            return out

        return {
            section: kept(section, values) if isinstance(values, dict) else values
            for section, values in self._source().items()
        }


def _section_json(section: str) -> dict[str, Any]:
    """The settings STREAMER_<SECTION>='{json}' gives, if it is set and a JSON object."""
    name = f"{ENV_PREFIX}{section}".upper()
    raw = next((value for var, value in os.environ.items() if var.upper() == name), None)
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def env_name(section: str, name: str) -> str:
    return f"{ENV_PREFIX}{section}{ENV_NESTED_DELIMITER}{name}".upper()


def flag_name(section: str, name: str) -> str:
    return f"--{section}-{name}".replace("_", "-")


def setting_names() -> set[tuple[str, str]]:
    """Every (section, name) of the settings tree."""
    return {
        (section, name)
        for section, info in Settings.model_fields.items()
        for name in info.annotation.model_fields  # type: ignore[union-attr]
    }


def describe_setting(section: str, name: str, has_flag: bool = True, flag: str | None = None) -> str:
    """``section.name (flag --section-name, env STREAMER_SECTION__NAME)``: where an operator sets
    it; has_flag False (the command at hand has no flag for it) names the variable and the file;
    ``flag``: the command's own flag for it, where that is named otherwise."""
    if flag is not None:
        return f"{section}.{name} (flag {flag}, env {env_name(section, name)})"
    if not has_flag:
        return f"{section}.{name} (env {env_name(section, name)} or the config file; this command has no flag for it)"
    return f"{section}.{name} (flag {flag_name(section, name)}, env {env_name(section, name)})"


def closest_setting(section: str | None, name: str) -> tuple[str, str] | None:
    """The real setting a mistyped ``section.name`` most likely meant (difflib), or None."""
    names = {f"{s}.{n}": (s, n) for s, n in setting_names()}
    if section is not None and section in Settings.model_fields:
        # Within the section first: [kafka] bootstrap_server -> kafka.bootstrap_servers.
        local = [n for s, n in names.values() if s == section]
        match = difflib.get_close_matches(name, local, n=1, cutoff=0.6)
        if match:
            return section, match[0]
    match = difflib.get_close_matches(f"{section}.{name}" if section else name, list(names), n=1, cutoff=0.6)
    if not match and section is None:  # a bare name: any section's setting of that name
        match = difflib.get_close_matches(name, [n for _, n in names.values()], n=1, cutoff=0.8)
        match = [f"{s}.{n}" for s, n in sorted(names.values()) if n == match[0]][:1] if match else []
    return names[match[0]] if match else None


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per STREAMER_* variable that is no setting (ignored), naming the closest real one."""
    environ = os.environ if environ is None else environ
    known = {env_name(s, n): (s, n) for s, n in setting_names()}
    sections = {f"{ENV_PREFIX}{s}".upper() for s in Settings.model_fields}  # a whole section as JSON
    warnings = []
    for var in sorted(environ):
        upper = var.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in sections or upper == CONFIG_ENV:
            continue
        if KUBERNETES_SERVICE_ENV.fullmatch(upper):
            continue
        # Compared without the common prefix, which would make every name look alike.
        suffixes = {name[len(ENV_PREFIX):]: name for name in [*known, CONFIG_ENV]}
        match = [suffixes[m] for m in difflib.get_close_matches(upper[len(ENV_PREFIX):], list(suffixes), n=1, cutoff=0.6)]
        if match and match[0] in known:
            hint = f"; did you mean {match[0]} (flag {flag_name(*known[match[0]])})?"
        elif match:
            hint = f"; did you mean {match[0]}?"
        else:
            hint = f"; settings are {ENV_PREFIX}<SECTION>{ENV_NESTED_DELIMITER}<NAME>, listed by `streamer run --help`"
        warnings.append(f"environment variable {var} is not a setting, ignored{hint}")
    return warnings


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML file's tables, checked to hold only settings; StreamerError names the file and
    the line (bad syntax) or the key (not a setting, with the closest real one)."""
    if not path.is_file():
        raise StreamerError(f"config file {path}: {not_a_file(path)}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line L, column C)"
        raise StreamerError(f"config file {path}: invalid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StreamerError(f"config file {path}: cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    problems = []
    for section, values in data.items():
        if section in Settings.model_fields and isinstance(values, dict):
            problems += [_not_a_setting(section, key) for key in values if (section, key) not in setting_names()]
        elif section in Settings.model_fields:
            problems.append(f"{section} must be a table ([{section}]), got {values!r}")
        elif isinstance(values, dict):
            match = difflib.get_close_matches(section, list(Settings.model_fields), n=1, cutoff=0.6)
            hint = f"; did you mean [{match[0]}]?" if match else f"; sections are {', '.join(Settings.model_fields)}"
            problems.append(f"[{section}] is not a settings section{hint}")
        else:
            problems.append(_not_a_setting(None, section))
    if problems:
        raise StreamerError(f"config file {path}: " + "; ".join(problems))
    return data


def _not_a_setting(section: str | None, key: str) -> str:
    where = f"[{section}] {key}" if section else f"{key} (outside any [section])"
    match = closest_setting(section, key)
    if match is None:
        return f"{where} is not a setting (`streamer run --help` lists them)"
    flags = f"(flag {flag_name(*match)}, env {env_name(*match)})"
    if section is None:
        return f"{where} is not a setting; did you mean {match[1]} under [{match[0]}] {flags}?"
    return f"{where} is not a setting; did you mean {match[1]} {flags}?"


def load_settings(overrides: dict[str, dict[str, object]] | None = None, config_file: Path | None = None) -> Settings:
    """Settings from flags (``overrides``, by section), env, then ``config_file`` (TOML).

    Raises StreamerError for a config file that is missing, not TOML or has keys that are no
    settings, and pydantic's ValidationError for bad values."""
    cls: type[Settings] = Settings
    if config_file is not None:
        read_config_file(config_file)
        cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": config_file}})
    try:
        return cls(**(overrides or {}))
    except SettingsError as exc:  # e.g. STREAMER_KAFKA='{not json'
        section = re.search(r'field "(\w+)"', str(exc))
        if section is None:
            raise StreamerError(f"settings from the environment: {exc}") from None
        var = f"{ENV_PREFIX}{section.group(1)}".upper()
        raise StreamerError(
            f"environment variable {var}: not a JSON object of settings of section {section.group(1)!r}"
            f" (or set one per variable: {var}{ENV_NESTED_DELIMITER}<NAME>)") from None
