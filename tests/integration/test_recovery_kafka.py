"""State that survives restarts and follows partitions, through the real broker."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from streamer.checkpoint import CheckpointStore, DirectoryCheckpointStore
from streamer.checkpoint_kafka import KafkaCheckpointStore
from streamer.kafka import ensure_topics, open_changelog
from streamer.kafka.clients import TopicSpec
from streamer.kafka.topics import COMPACT
from streamer.settings import KafkaSettings
from streamer.engine import Engine, ReadingBatch
from streamer.metrics import RECOVERY_OUTCOMES
from streamer.model import ModelConfig, init_random_model, load_model_file, save_model_file
from tests.integration.helpers import ServiceThread, create_topic, produce, read_topic, service_settings
from tests.test_engine import offline_forecasts

pytestmark = pytest.mark.kafka

DEVICES, PARTITIONS = 24, 3
REPO = Path(__file__).resolve().parents[2]
STORES = ["directory", "kafka"]  # checkpoint.store


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


class Scenario:
    """One input topic, devices with known sequences, and services run against it."""

    def __init__(self, bootstrap: str, unique: str, tmp_path: Path, exactly_once: bool = False,
                 store: str = "directory") -> None:
        self.bootstrap = bootstrap
        self.topics = {name: f"{name}-{unique}" for name in ("in", "out", "dlq", "ckpt")}
        create_topic(bootstrap, self.topics["in"], PARTITIONS)
        create_topic(bootstrap, self.topics["out"], 1)
        self.store = store
        if store == "kafka":
            ensure_topics(bootstrap, {self.topics["ckpt"]: TopicSpec(2, 1, dict(COMPACT))})
        self.group = f"g-{unique}"
        self.checkpoints = tmp_path / "checkpoints"
        config = ModelConfig(2, 12, 2, 2)
        self.model_path = tmp_path / "model.pt"
        save_model_file(self.model_path, init_random_model(config, seed=9), config, "v1")
        self.rng = np.random.default_rng(5)
        self.devices = [f"dev-{d:02d}" for d in range(DEVICES)]
        self.sequences: dict[str, list[np.ndarray]] = {d: [] for d in self.devices}
        self.exactly_once = exactly_once

    @property
    def readings(self) -> int:
        return sum(len(s) for s in self.sequences.values())

    def produce(self, per_device: int) -> None:
        messages = []
        for _ in range(per_device):
            for device in self.devices:
                value = self.rng.normal(size=2).astype(np.float32)
                t = len(self.sequences[device])
                self.sequences[device].append(value)
                body = {"device_id": device, "ts": 1_700_000_000.0 + t, "values": value.tolist()}
                messages.append((device.encode(), json.dumps(body).encode(), None))
        produce(self.bootstrap, self.topics["in"], messages)

    def settings(self, **sections):
        overrides = {
            "kafka": {"session_timeout_ms": 6000, "exactly_once": self.exactly_once},
            "batch": {"max_records": 50, "max_wait_ms": 10},
            "model": {"reload_interval_s": 0.2},
            "checkpoint": {"interval_s": 3600, "store": self.store, "topic": self.topics["ckpt"]},
        }
        for name, values in sections.items():
            overrides[name] = {**overrides.get(name, {}), **values}
        return service_settings(self.bootstrap, self.topics, self.group, self.model_path, self.checkpoints, **overrides)

    def start(self, **sections) -> ServiceThread:
        return ServiceThread(self.settings(**sections))

    def process_env(self, **sections: dict[str, str]) -> dict[str, str]:
        """Environment for ``python -m streamer run`` against this scenario, sections overridden."""
        env = {**os.environ}
        settings = {
            "KAFKA": {"BOOTSTRAP_SERVERS": self.bootstrap, "INPUT_TOPIC": self.topics["in"],
                      "OUTPUT_TOPIC": self.topics["out"], "DEAD_LETTER_TOPIC": self.topics["dlq"],
                      "GROUP_ID": self.group},
            "MODEL": {"PATH": str(self.model_path), "DEVICE": "cpu"},
            "CHECKPOINT": {"DIRECTORY": str(self.checkpoints), "INTERVAL_S": "3600", "STORE": self.store,
                           "TOPIC": self.topics["ckpt"]},
            "METRICS": {"ENABLED": "false"},
        }
        for section, values in sections.items():
            settings[section] = {**settings.get(section, {}), **values}
        for section, values in settings.items():
            for name, value in values.items():
                env[f"STREAMER_{section}__{name}"] = value
        return env

    def run_logged(self, log_path: Path, **sections: dict[str, str]) -> subprocess.Popen:
        """``python -m streamer run`` against this scenario (``process_env``'s sections), its
        output to ``log_path``; model reloads checked every 0.2 s, batches of up to 50."""
        sections = {"MODEL": {"RELOAD_INTERVAL_S": "0.2"}, "BATCH": {"MAX_RECORDS": "50", "MAX_WAIT_MS": "10"}, **sections}
        with open(log_path, "w") as log_file:
            return subprocess.Popen([sys.executable, "-m", "streamer", "run"], env=self.process_env(**sections),
                                    cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)

    def checkpoint_store(self) -> CheckpointStore:
        """The store the services write to, opened afresh (close it)."""
        if self.store == "kafka":
            changelog = open_changelog(KafkaSettings(bootstrap_servers=self.bootstrap, client=os.environ["STREAMER_KAFKA__CLIENT"]),
                                       self.topics["ckpt"], 512 * 1024, 30_000)
            return KafkaCheckpointStore(changelog, self.group)
        return DirectoryCheckpointStore(self.checkpoints, self.group)

    def newest_checkpoints_sum(self) -> int:
        store = self.checkpoint_store()
        try:
            return sum(store.offsets(self.topics["in"], p)[0] for p in range(PARTITIONS))
        finally:
            store.close()

    def damage_newest(self, torn: int, lost: int) -> int:
        """Partition ``torn``'s newest checkpoint corrupted, ``lost``'s deleted (as if the process
        had died before writing them); returns the sum of their offsets."""
        store = self.checkpoint_store()
        topic = self.topics["in"]
        try:
            if isinstance(store, KafkaCheckpointStore):
                offsets = [store.offsets(topic, p)[0] for p in (torn, lost)]
                at = store.changelog_partition(topic, torn)
                first_chunk = store._index(at).manifests[(topic, torn)][offsets[0]].chunks[0].key
                store.changelog.write(at, [(first_chunk.encode(), b"torn")], 30)
                at = store.changelog_partition(topic, lost)
                store.changelog.write(at, [(store._key(topic, lost, offsets[1], "manifest").encode(), None)], 30)
                return sum(offsets)
            newest = [store.paths(topic, p)[0] for p in (torn, lost)]
            newest[0].write_bytes(newest[0].read_bytes()[:-100])
            newest[1].unlink()
            return sum(int(path.stem) for path in newest)
        finally:
            store.close()

    def outputs(self, expected: int, timeout_s: float = 90) -> list[dict]:
        records = read_topic(self.bootstrap, self.topics["out"], expected, timeout_s=timeout_s,
                             committed_only=self.exactly_once)
        return [json.loads(r.value) for r in records]

    def check(self, outputs: list[dict], bundle=None) -> dict[str, int]:
        """Every reading so far has a prediction equal to the offline model; returns counts."""
        bundle = bundle or load_model_file(self.model_path)
        by_key = defaultdict(list)
        for o in outputs:
            by_key[(o["device_id"], o["ts"])].append(o)
        for device, seq in self.sequences.items():
            reference = offline_forecasts(bundle, np.stack(seq))
            for t, expected in enumerate(reference):
                got = by_key.get((device, 1_700_000_000.0 + t))
                assert got, f"{device} reading {t} has no prediction"
                for prediction in got:
                    np.testing.assert_allclose(prediction["forecast"], expected, atol=1e-5, rtol=0,
                                               err_msg=f"{device} reading {t}")
        return {"predictions": len(outputs), "distinct": len(by_key), "duplicates": len(outputs) - len(by_key)}


def test_restart_resumes_every_device_from_its_checkpoint(kafka_bootstrap, unique, tmp_path, store_kind):
    s = Scenario(kafka_bootstrap, unique, tmp_path, store=store_kind)
    s.produce(6)
    first = s.start()
    s.check(s.outputs(s.readings))
    first.stop()
    assert first.metric("streamer_partition_recoveries_total", outcome="fresh") == PARTITIONS
    assert s.newest_checkpoints_sum() == s.readings

    s.produce(6)
    second = s.start()
    counts = s.check(s.outputs(s.readings))
    second.stop()
    assert counts["duplicates"] == 0
    assert second.metric("streamer_partition_recoveries_total", outcome="checkpoint") == PARTITIONS
    assert second.metric("streamer_replayed_messages_total") == 0


def test_lost_or_corrupt_checkpoints_are_rebuilt_by_replay_without_republishing(
    kafka_bootstrap, unique, tmp_path, store_kind
):
    s = Scenario(kafka_bootstrap, unique, tmp_path, store=store_kind)
    s.produce(8)
    first = s.start()
    s.outputs(s.readings)
    first.stop()
    # As if the process had died before checkpointing: partition 0's newest checkpoint is torn,
    # partition 1's is gone; partition 2 keeps its own. The older ones are at offset 0.
    replay = s.damage_newest(torn=0, lost=1)

    s.produce(4)
    second = s.start()
    counts = s.check(s.outputs(s.readings))
    second.stop()
    assert counts["duplicates"] == 0, "replayed readings must not be published again"
    assert second.metric("streamer_replayed_messages_total") == replay
    assert second.metric("streamer_checkpoints_refused_total") == 1
    assert second.metric("streamer_partition_recoveries_total", outcome="no_checkpoint") == 0


def test_a_restart_with_a_smaller_table_than_its_checkpoints_restores_what_fits(
    kafka_bootstrap, unique, tmp_path, caplog
):
    # state.capacity lowered below what each partition's checkpoint holds (about 8 devices): the
    # devices seen last come back, the others start from zero, and the service goes on.
    caplog.set_level(logging.WARNING, logger="streamer.partitions")
    s = Scenario(kafka_bootstrap, unique, tmp_path)
    s.produce(4)
    first = s.start()
    s.check(s.outputs(s.readings))
    first.stop()
    assert s.newest_checkpoints_sum() == s.readings

    s.produce(2)
    second = s.start(state={"capacity": 3}, batch={"max_records": 3})
    outputs = s.outputs(s.readings)
    assert second.alive()
    second.stop()
    assert second.metric("streamer_partition_recoveries_total", outcome="checkpoint") == PARTITIONS
    warned = [r.getMessage() for r in caplog.records if "more than state.capacity (3)" in r.getMessage()]
    assert len(warned) == PARTITIONS
    published = Counter((o["device_id"], o["ts"]) for o in outputs)
    assert published == Counter({(d, 1_700_000_000.0 + t): 1 for d in s.devices for t in range(6)})


def test_a_step_that_fails_part_way_is_applied_once_after_a_restart(kafka_bootstrap, unique, tmp_path, monkeypatch):
    # The third step raises after it changed the rows (a GPU error at its last copy): the loop
    # ends, and what its consumer's close checkpoints must not hold that batch, or the restart
    # would apply it a second time and every later forecast of its devices would be off.
    s = Scenario(kafka_bootstrap, unique, tmp_path)
    s.produce(6)
    step, calls = Engine.step, []

    def fails_the_third_time(engine, *args, **kwargs):
        result = step(engine, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA error: out of memory")
        return result

    monkeypatch.setattr(Engine, "step", fails_the_third_time)
    first = s.start(batch={"max_records": 40}, kafka={"commit_interval_ms": 0})  # each batch committed
    first.thread.join(timeout=90)
    with pytest.raises(RuntimeError, match="out of memory"):
        first.stop()
    monkeypatch.setattr(Engine, "step", step)
    s.produce(2)
    second = s.start()
    s.check(s.outputs(s.readings))  # every forecast, of the failed batch too, as the offline model's
    second.stop()


def wait_logged(log_path: Path, text: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert text in log_path.read_text(), log_path.read_text()[-3000:]


def taken_on(service: ServiceThread, timeout_s: float = 60.0) -> None:
    """Wait until a service that joined the group has taken on a partition (the rebalance done):
    the readings produced next are partly its own, however slow its start on a loaded host."""
    deadline = time.monotonic() + timeout_s
    while sum(service.metric("streamer_partition_recoveries_total", outcome=o) for o in RECOVERY_OUTCOMES) < 1:
        assert service.alive() and time.monotonic() < deadline, "the new process took on no partition"
        time.sleep(0.1)


def test_two_processes_hand_devices_back_and_forth(kafka_bootstrap, unique, tmp_path, store_kind):
    s = Scenario(kafka_bootstrap, unique, tmp_path, store=store_kind)
    a = s.start()
    s.produce(5)
    s.outputs(s.readings)
    b = s.start()  # takes some partitions from a
    taken_on(b)
    s.produce(5)
    s.outputs(s.readings)
    a_summary = a.stop()  # b takes everything
    s.produce(5)
    s.outputs(s.readings)
    c = s.start()  # and hands some back to a new process
    taken_on(c)
    s.produce(5)
    counts = s.check(s.outputs(s.readings))
    b_summary, c_summary = b.stop(), c.stop()
    assert counts["distinct"] == s.readings
    for running in (a, b, c):
        assert running.metric("streamer_partition_recoveries_total", outcome="no_checkpoint") == 0
    assert b.metric("streamer_partition_recoveries_total", outcome="checkpoint") >= 1
    assert c.metric("streamer_partition_recoveries_total", outcome="checkpoint") >= 1
    assert min(a_summary.readings, b_summary.readings, c_summary.readings) > 0


def test_three_processes_with_separate_disks_hand_devices_over_through_the_changelog(kafka_bootstrap, unique, tmp_path):
    """Each service has its own checkpoint.directory (a pod's local disk) and shares nothing but
    the broker: every handover still recovers from a checkpoint, never from zero."""
    s = Scenario(kafka_bootstrap, unique, tmp_path, store="kafka")
    disks = {name: tmp_path / f"disk-{name}" for name in ("a", "b", "c")}

    def start(name: str) -> ServiceThread:
        return s.start(checkpoint={"directory": disks[name]})

    a = start("a")
    s.produce(4)
    s.outputs(s.readings)
    b = start("b")  # takes some of a's partitions
    taken_on(b)
    s.produce(4)
    s.outputs(s.readings)
    c = start("c")  # and some more
    taken_on(c)
    s.produce(4)
    s.outputs(s.readings)
    a.stop()  # b and c take a's
    s.produce(4)
    s.outputs(s.readings)
    again = start("a")  # a's partitions come back to a new process on a's disk
    taken_on(again)
    s.produce(4)
    counts = s.check(s.outputs(s.readings))
    summaries = [b.stop(), c.stop(), again.stop()]
    assert counts["distinct"] == s.readings
    services = (a, b, c, again)
    for running in services:
        assert running.metric("streamer_partition_recoveries_total", outcome="no_checkpoint") == 0
    assert a.metric("streamer_partition_recoveries_total", outcome="fresh") == PARTITIONS
    assert sum(r.metric("streamer_partition_recoveries_total", outcome="fresh") for r in services) == PARTITIONS
    assert sum(r.metric("streamer_partition_recoveries_total", outcome="checkpoint") for r in services) >= 3
    assert min(summary.readings for summary in summaries) > 0
    assert not any(path.is_file() for disk in disks.values() if disk.exists() for path in disk.rglob("*"))


def test_exactly_once_outputs_each_prediction_once(kafka_bootstrap, unique, tmp_path):
    s = Scenario(kafka_bootstrap, unique, tmp_path, exactly_once=True)
    s.produce(6)
    running = s.start()
    counts = s.check(s.outputs(s.readings))
    running.stop()
    s.produce(4)
    again = s.start()
    counts = s.check(s.outputs(s.readings))
    again.stop()
    assert counts["duplicates"] == 0 and counts["distinct"] == s.readings


def test_corrupt_model_file_keeps_the_old_model_serving(kafka_bootstrap, unique, tmp_path):
    s = Scenario(kafka_bootstrap, unique, tmp_path)
    old = load_model_file(s.model_path)
    running = s.start()
    s.produce(3)
    s.outputs(s.readings)
    s.model_path.write_bytes(b"\x00 this is no longer a model")
    deadline = time.monotonic() + 20
    while running.metric("streamer_model_reloads_total", outcome="failed") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    s.produce(3)
    outputs = s.outputs(s.readings)
    s.check(outputs, bundle=old)
    assert {o["model_version"] for o in outputs} == {"v1"}
    assert running.metric("streamer_model_reloads_total", outcome="failed") == 1
    # A good file of the same shape takes over without a restart, state carried on.
    config = ModelConfig(2, 12, 2, 2)
    save_model_file(s.model_path, init_random_model(config, seed=10), config, "v2")
    deadline = time.monotonic() + 20
    while running.metric("streamer_model_reloads_total", outcome="loaded") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    s.produce(1)
    outputs = s.outputs(s.readings)
    running.stop()
    assert {o["model_version"] for o in outputs[-DEVICES:]} == {"v2"}


def test_sigterm_finishes_commits_checkpoints_and_exits_zero(kafka_bootstrap, unique, tmp_path, store_kind):
    s = Scenario(kafka_bootstrap, unique, tmp_path, store=store_kind)
    s.produce(5)
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "run"], env=s.process_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        s.check(s.outputs(s.readings))
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - sent < 15
    assert json.loads(out.strip().splitlines()[-1])["summary"]["predictions"] == s.readings
    assert s.newest_checkpoints_sum() == s.readings


def forecasts_under(bundles: dict, seq: list[np.ndarray], versions: list[str]) -> np.ndarray:
    """One device's forecasts from streamer.engine, reading by reading, switching to the model
    named in ``versions`` where it changes (as a hot reload does: state carried over)."""
    engine = Engine.build(bundles[versions[0]], capacity=4, device="cpu")
    out = []
    for t, (value, version) in enumerate(zip(seq, versions)):
        if version != engine.model_version:
            engine.swap_model(bundles[version])
        batch = ReadingBatch(["d"], np.array([1_700_000_000.0 + t]), value[None].astype(np.float32))
        out.append(engine.step(batch)[0].forecast[0])
    return np.stack(out)


def test_a_switch_the_store_failed_then_a_crash_is_not_replayed_by_a_process_on_the_old_model(
    kafka_bootstrap, unique, tmp_path
):
    """The store fails at a model switch (its checkpoints under the new model are never written),
    the process dies, and its partitions go to a process still on the old model: the committed
    offsets say that the new model applied the readings before them, so that process starts its
    devices from zero state at the committed offsets and replays nothing under the old model."""
    from kafka.admin import KafkaAdminClient

    from streamer.checkpoint import ModelSpan, ModelStamp

    s = Scenario(kafka_bootstrap, unique, tmp_path)
    config = ModelConfig(2, 12, 2, 2)
    old_model = tmp_path / "v1.pt"
    old_model.write_bytes(s.model_path.read_bytes())
    log_path = tmp_path / "first.log"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    away = tmp_path / "checkpoints-away"
    proc = s.run_logged(log_path, KAFKA={"SESSION_TIMEOUT_MS": "6000", "COMMIT_INTERVAL_MS": "100"})
    try:
        s.produce(3)
        s.outputs(s.readings)
        s.checkpoints.rename(away)  # the store fails from here on: its root is a file
        s.checkpoints.write_bytes(b"")
        save_model_file(s.model_path, init_random_model(config, seed=10), config, "v2")  # written, then renamed
        wait_logged(log_path, "now serving model v2")
        s.produce(3)  # applied under v2 and committed, in no checkpoint
        assert {o["model_version"] for o in s.outputs(s.readings)[-DEVICES:]} == {"v2"}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            committed = {tp.partition: o for tp, o in admin.list_group_offsets({s.group: None})[s.group].items()}
            if sum(o.offset for o in committed.values()) == s.readings:
                break
            time.sleep(0.1)
        assert sum(o.offset for o in committed.values()) == s.readings, committed
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        admin.close()
    served = load_model_file(s.model_path)
    v2 = ModelStamp.of("v2", served.config.to_dict()).digest()
    assert {getattr(ModelSpan.decode(o.metadata), "model", None) for o in committed.values()} == {v2}, committed
    s.checkpoints.unlink()
    away.rename(s.checkpoints)  # the store is back, with v1's checkpoints from before the switch only
    known = {d: len(seq) for d, seq in s.sequences.items()}

    s.produce(3)
    second = s.start(model={"path": old_model, "reload_interval_s": 3600}, kafka={"session_timeout_ms": 6000})
    outputs = s.outputs(s.readings + DEVICES * 3)  # v2's outputs, then the new readings' (under v1)
    second.stop()
    assert second.metric("streamer_partition_recoveries_total", outcome="no_checkpoint") == PARTITIONS
    assert second.metric("streamer_checkpoints_refused_total") >= PARTITIONS
    assert second.metric("streamer_replayed_messages_total") == 0
    old = load_model_file(old_model)
    by_key = {(o["device_id"], o["ts"]): o for o in outputs if o["model_version"] == "v1"}
    for device, seq in s.sequences.items():
        expected = offline_forecasts(old, np.stack(seq[known[device]:]))  # from zero state at the commit
        for t in range(known[device], len(seq)):
            got = by_key[(device, 1_700_000_000.0 + t)]
            np.testing.assert_allclose(got["forecast"], expected[t - known[device]], atol=1e-5, rtol=0,
                                       err_msg=f"{device} reading {t}")


def test_a_model_switch_then_a_crash_replays_each_reading_under_the_model_that_applied_it(
    kafka_bootstrap, unique, tmp_path, store_kind
):
    s = Scenario(kafka_bootstrap, unique, tmp_path, store=store_kind)
    config = ModelConfig(2, 12, 2, 2)
    bundles = {"v1": load_model_file(s.model_path)}
    log_path = tmp_path / "first.log"
    proc = s.run_logged(log_path, KAFKA={"SESSION_TIMEOUT_MS": "6000"})
    try:
        s.produce(4)
        s.outputs(s.readings)

        def feed() -> None:  # readings keep coming while the new model file is picked up
            for _ in range(8):
                s.produce(1)
                time.sleep(0.15)

        feeder = threading.Thread(target=feed)
        feeder.start()
        time.sleep(0.4)
        save_model_file(s.model_path, init_random_model(config, seed=10), config, "v2")  # written, then renamed
        feeder.join()
        wait_logged(log_path, "now serving model v2")
        s.produce(4)  # applied under v2 after the switch: replayed after the crash
        first = s.outputs(s.readings)
        assert {o["model_version"] for o in first[-DEVICES:]} == {"v2"}, log_path.read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    bundles["v2"] = load_model_file(s.model_path)

    s.produce(4)
    second = s.start(kafka={"session_timeout_ms": 6000})
    outputs = s.outputs(s.readings)
    second.stop()
    assert second.metric("streamer_partition_recoveries_total", outcome="checkpoint") >= PARTITIONS
    assert second.metric("streamer_partition_recoveries_total", outcome="no_checkpoint") == 0
    assert second.metric("streamer_replayed_messages_total") > 0, "the crash should leave readings to replay"

    published: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for o in outputs:
        published[(o["device_id"], o["ts"])].append(o)
    crossed = 0
    for device, seq in s.sequences.items():
        keys = [(device, 1_700_000_000.0 + t) for t in range(len(seq))]
        assert all(published[k] for k in keys), f"{device}: a reading has no prediction"
        versions = []
        for key in keys:
            seen = {o["model_version"] for o in published[key]}
            assert len(seen) == 1, f"{key} published under {seen}"
            versions.append(seen.pop())
        assert versions == sorted(versions), f"{device}: {versions}"
        crossed += "v1" in versions and "v2" in versions
        expected = forecasts_under(bundles, seq, versions)
        for t, key in enumerate(keys):
            for o in published[key]:
                np.testing.assert_allclose(o["forecast"], expected[t], atol=1e-5, rtol=0,
                                           err_msg=f"{device} reading {t} ({versions[t]})")
    assert crossed == DEVICES
