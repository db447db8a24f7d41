"""SASL_SSL end to end on a broker of this module's own: TLS signed by a test CA, SCRAM-SHA-256 and
PLAIN logins, a refused login, and passwords kept out of reprs, error messages and logs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import SaslAuthenticationFailedError
from pydantic import ValidationError

from streamer.cli import main
from streamer.kafka.clients import KafkaBootstrapError, KafkaLoginError, ensure_topics, make_producer, security_config
from streamer.model import ModelConfig, Normalization, init_random_model, save_model_file
from streamer.service import run_service
from streamer.settings import KafkaSettings, Settings, load_settings
from tests.integration.conftest import LOCAL_KAFKA, free_port
from tests.integration.helpers import ServiceThread

pytestmark = pytest.mark.kafka

# Passwords unlike any other text, so that finding one in a log means it leaked.
ALICE = ("alice", f"alice-{uuid.uuid4().hex}")  # logs in with SCRAM-SHA-256
BOB = ("bob", f"bob-{uuid.uuid4().hex}")  # logs in with PLAIN
N_DEVICES, N_READINGS = 5, 4

# The server certificate names 127.0.0.1 and localhost; the CA's and its own extensions are the
# ones strict verification (Python 3.13's VERIFY_X509_STRICT) asks for.
SERVER_EXTENSIONS = """\
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
"""


@dataclass(frozen=True)
class SecureBroker:
    bootstrap: str  # the SASL_SSL listener, host:port
    cafile: Path


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server key (PKCS#8) and certificate signed by it: (ca.pem, server.key, server.pem)."""
    def openssl(*args: str) -> None:
        done = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"openssl {args[0]} failed:\n{done.stderr}"

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=streamer test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost")
    (directory / "server.ext").write_text(SERVER_EXTENSIONS)
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    return directory / "ca.pem", directory / "server.key", directory / "server.pem"


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    try:
        subprocess.run(["openssl", "version"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("the openssl command is needed to make the test certificates")
    directory = tmp_path_factory.mktemp("secure-kafka")
    ca, key, cert = make_certificates(directory)
    sasl_port = free_port()
    env = {
        **os.environ,
        "KAFKA_PORT": "auto",
        "KAFKA_STATE_DIR": str(directory / "state"),
        "KAFKA_SASL_SSL_PORT": str(sasl_port),
        "KAFKA_SSL_KEY_PEM": str(key),
        "KAFKA_SSL_CERT_PEM": str(cert),
        "KAFKA_SASL_USERS": ",".join(f"{name}:{password}" for name, password in (ALICE, BOB)),
    }
    started = subprocess.run([str(LOCAL_KAFKA), "start"], env=env, capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.fail(f"local Kafka with SASL_SSL did not start:\n{started.stderr[-4000:]}")
    try:
        yield SecureBroker(f"127.0.0.1:{sasl_port}", ca)
    finally:
        subprocess.run([str(LOCAL_KAFKA), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(directory / "state", ignore_errors=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = ModelConfig(1, 8, 1, 1)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model_file(path, init_random_model(config, seed=1), config, "sec-v1",
                    Normalization(torch.tensor([0.0]), torch.tensor([1.0])))
    return path


def secure_settings(broker: SecureBroker, mechanism: str, user: tuple[str, str], unique: str, model_path: Path,
                    tmp_path: Path) -> Settings:
    name, password = user
    return load_settings({
        "kafka": {"bootstrap_servers": broker.bootstrap, "input_topic": f"in-{unique}", "output_topic": f"out-{unique}",
                  "dead_letter_topic": f"dlq-{unique}", "group_id": f"g-{unique}", "security_protocol": "SASL_SSL",
                  "sasl_mechanism": mechanism, "sasl_username": name, "sasl_password": password,
                  "ssl_cafile": str(broker.cafile), "startup_wait_s": 0},
        "batch": {"max_records": 64, "max_wait_ms": 20},
        "model": {"path": model_path, "device": "cpu", "reload_interval_s": 0},
        "state": {"capacity": 100},
        "checkpoint": {"directory": tmp_path / "checkpoints"},
        "metrics": {"enabled": False},
        "run": {"status_interval_s": 0},
    })


def read_secure(kafka: KafkaSettings, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    """Every record of ``topic`` over the secure listener, waiting for ``expected`` and 0.5 s more."""
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False,
                             auto_offset_reset="earliest", **security_config(kafka))
    try:
        deadline = time.monotonic() + timeout_s
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.2)
            partitions = consumer.partitions_for_topic(topic)
        assert partitions, f"topic {topic} never appeared"
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        records: list = []
        settle_until = None
        while time.monotonic() < deadline and (settle_until is None or time.monotonic() < settle_until):
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            if len(records) >= expected and settle_until is None:
                settle_until = time.monotonic() + 0.5
        return records
    finally:
        consumer.close()


@pytest.mark.parametrize("mechanism, user", [("SCRAM-SHA-256", ALICE), ("PLAIN", BOB)], ids=["scram", "plain"])
def test_service_end_to_end_over_sasl_ssl(secure_broker, model_path, unique, tmp_path, caplog, mechanism, user):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="kafka")  # the CLI, run by earlier tests, quiets it to WARNING
    settings = secure_settings(secure_broker, mechanism, user, unique, model_path, tmp_path)
    kafka = settings.kafka
    assert ensure_topics(kafka.bootstrap_servers, {kafka.input_topic: 2}, security=security_config(kafka)) == [
        kafka.input_topic
    ]
    producer = make_producer(kafka)
    try:
        futures = [
            producer.send(kafka.input_topic, key=f"dev-{d}".encode(),
                          value=json.dumps({"device_id": f"dev-{d}", "ts": 1_700_000_000 + t, "values": [t * 0.5]}).encode())
            for t in range(N_READINGS) for d in range(N_DEVICES)
        ]
        producer.flush()
        for future in futures:
            future.get(timeout=30)
    finally:
        producer.close()

    service = ServiceThread(settings)
    try:
        out = read_secure(kafka, kafka.output_topic, N_DEVICES * N_READINGS)
    finally:
        summary = service.stop(timeout_s=30)
    assert len(out) == N_DEVICES * N_READINGS
    assert {json.loads(record.value)["model_version"] for record in out} == {"sec-v1"}
    assert summary.predictions == N_DEVICES * N_READINGS

    # The run's own logs, kafka-python's DEBUG included (the admin client logs its configuration).
    assert any("KafkaAdminClient" in record.getMessage() for record in caplog.records)
    assert user[1] not in caplog.text


def test_wrong_password_fails_clearly_and_in_bounded_time(secure_broker, model_path, unique, tmp_path):
    """A refused login ends the service with an error naming the address, mechanism and user.

    It is KafkaLoginError when kafka-python saw the broker's refusal, which it often drops (see
    streamer.kafka.clients), else KafkaBootstrapError naming a refused login as a possible cause.
    """
    name, password = ALICE
    wrong = "not-" + password
    settings = secure_settings(secure_broker, "SCRAM-SHA-256", (name, wrong), unique, model_path, tmp_path)
    outcome: dict = {}
    started = time.monotonic()
    runner = threading.Thread(target=lambda: outcome.update(error=_raised(run_service, settings, threading.Event())),
                              daemon=True)
    runner.start()
    runner.join(timeout=50)  # kafka-python gives up bootstrapping after 30 s
    assert not runner.is_alive(), "run_service hung on a refused login"
    error = outcome["error"]
    assert isinstance(error, KafkaBootstrapError), repr(error)
    assert time.monotonic() - started < 45
    text = str(error)
    assert secure_broker.bootstrap in text and "SCRAM-SHA-256 as user 'alice'" in text
    assert "refused" in text and wrong not in text and password not in text
    if isinstance(error, KafkaLoginError):
        assert isinstance(error.refusal, SaslAuthenticationFailedError)


def test_a_refused_login_is_named_by_each_client(secure_broker, model_path, unique, tmp_path, kafka_client, caplog):
    """The client of kafka.client itself (the service's first contact is the topic admin, which is
    kafka-python's on both): a consumer with a wrong password fails within its bootstrap timeout,
    naming the user and a refused login; librdkafka always reports the refusal (KafkaLoginError)."""
    from streamer.kafka import open_consumer

    name, password = ALICE
    wrong = "not-" + password
    settings = secure_settings(secure_broker, "SCRAM-SHA-256", (name, wrong), unique, model_path, tmp_path)
    assert settings.kafka.client == kafka_client
    started = time.monotonic()
    with pytest.raises(KafkaBootstrapError) as refused:
        open_consumer(settings.kafka, 10, bootstrap_timeout_ms=10_000)
    assert time.monotonic() - started < 20
    text = str(refused.value)
    assert secure_broker.bootstrap in text and "SCRAM-SHA-256 as user 'alice'" in text
    assert "refused" in text and wrong not in text and password not in text
    if kafka_client == "confluent-kafka":
        assert isinstance(refused.value, KafkaLoginError)
    assert wrong not in caplog.text


def _raised(function, *args) -> BaseException | None:
    try:
        function(*args)
    except BaseException as exc:
        return exc
    return None


def test_passwords_stay_out_of_reprs_and_error_messages(model_path, unique, tmp_path, capsys):
    name, password = ALICE
    cafile, _, _ = make_certificates(tmp_path)  # read by the settings' check, the broker never asked
    settings = secure_settings(SecureBroker("127.0.0.1:9093", cafile), "SCRAM-SHA-256", ALICE, unique, model_path,
                               tmp_path)
    assert settings.kafka.sasl_password.get_secret_value() == password
    for shown in (repr(settings), str(settings), settings.model_dump_json(), repr(settings.kafka)):
        assert password not in shown

    # Incomplete settings: the validation error names what is missing, never the password.
    with pytest.raises(ValidationError) as invalid:
        load_settings({"kafka": {"security_protocol": "SASL_SSL", "sasl_password": password, "ssl_password": password}})
    text = str(invalid.value) + invalid.value.json() + repr(invalid.value.errors())
    assert "kafka.sasl_mechanism, kafka.sasl_username" in text and password not in text
    with pytest.raises(ValidationError, match="ssl_cafile .*absent.pem: no such file"):
        load_settings({"kafka": {"security_protocol": "SSL", "ssl_cafile": str(tmp_path / "absent.pem")}})

    # The same through the CLI.
    assert main(["run", "--kafka-security-protocol", "SASL_SSL", "--kafka-sasl-password", password]) == 2
    err = capsys.readouterr().err
    assert "needs kafka.sasl_mechanism (flag --kafka-sasl-mechanism, env STREAMER_KAFKA__SASL_MECHANISM)" in err
    assert "kafka.sasl_username (flag --kafka-sasl-username" in err and password not in err
