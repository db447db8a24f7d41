"""A real Kafka broker for integration tests, never a fake, and the Kafka client they run on.

KAFKA_BOOTSTRAP_SERVERS when set; else testcontainers' Kafka when a Docker engine answers;
else deploy/kafka/local-kafka started on a free port for this session and stopped after it.

Every integration test runs once per client library (``kafka_client``: kafka-python and
confluent-kafka), set as STREAMER_KAFKA__CLIENT for the settings the test builds; subprocesses
get it as --kafka-client. STREAMER_TEST_KAFKA_CLIENTS (comma-separated) narrows the list.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_KAFKA = REPO / "deploy" / "kafka" / "local-kafka"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _docker_engine_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        return bool(client.ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    if _docker_engine_answers():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    state_dir = tempfile.mkdtemp(prefix="streamer-test-kafka-")
    env = {**os.environ, "KAFKA_PORT": "auto", "KAFKA_STATE_DIR": state_dir}
    started = subprocess.run([str(LOCAL_KAFKA), "start"], env=env, capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.fail(f"local Kafka did not start:\n{started.stderr[-4000:]}")
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(LOCAL_KAFKA), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state_dir, ignore_errors=True)


KAFKA_CLIENTS = [
    name.strip() for name in os.environ.get("STREAMER_TEST_KAFKA_CLIENTS", "kafka-python,confluent-kafka").split(",")
    if name.strip()
]


@pytest.fixture(autouse=True, params=KAFKA_CLIENTS)
def kafka_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The client library this run of the test uses (kafka.client)."""
    monkeypatch.setenv("STREAMER_KAFKA__CLIENT", request.param)
    return request.param


@pytest.fixture(autouse=True)
def services_stopped() -> Iterator[None]:
    """Whatever service threads a test started are stopped when it ends, passed or failed."""
    from tests.integration.helpers import ServiceThread

    yield
    ServiceThread.stop_left_running()


@pytest.fixture
def unique() -> str:
    """A suffix for per-test topics and group ids."""
    return uuid.uuid4().hex[:10]
