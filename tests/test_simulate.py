"""The simulated fleet: deterministic per seed, the same process in history and live, labelled anomalies."""

import itertools

import numpy as np
import pytest

from streamer import simulate
from streamer.kafka.abstract import KafkaClientError
from streamer.kafka.memory import MemoryBroker, MemoryProducer
from streamer.simulate import ANOMALY_KINDS, Fleet, FleetSpec, SimulationError, history, run_simulator


def rounds(fleet: Fleet, n: int) -> tuple[np.ndarray, list[list[str | None]]]:
    """n rounds -> values (n, devices, features), labels [round][device]."""
    values, labels = [], []
    for _ in range(n):
        readings = fleet.next_round()
        values.append([r.values for r in readings])
        labels.append([r.anomaly for r in readings])
    return np.array(values), labels


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"devices": 0}, "devices"),
        ({"devices": 2, "features": 0}, "features"),
        ({"devices": 2, "period": -1}, "period"),
        ({"devices": 2.5}, "devices"),
        ({"devices": 2, "seed": -1}, "seed"),
        ({"devices": 2, "noise": -0.1}, "noise"),
        ({"devices": 2, "noise": float("nan")}, "noise"),
        ({"devices": 2, "anomaly_rate": 1.5}, "anomaly_rate"),
        ({"devices": 2, "anomaly_rate": -0.01}, "anomaly_rate"),
    ],
)
def test_fleet_spec_rejects_bad_fields(kwargs: dict, field: str):
    with pytest.raises(ValueError, match=rf"FleetSpec\.{field} .*got"):
        FleetSpec(**kwargs)


def test_fleet_is_deterministic_per_seed():
    spec = FleetSpec(devices=30, features=2, seed=5, anomaly_rate=0.05)
    a_values, a_labels = rounds(Fleet(spec), 40)
    b_values, b_labels = rounds(Fleet(spec), 40)
    np.testing.assert_array_equal(a_values, b_values)
    assert a_labels == b_labels
    c_values, _ = rounds(Fleet(FleetSpec(devices=30, features=2, seed=6, anomaly_rate=0.05)), 40)
    assert not np.allclose(a_values, c_values)


def test_rounds_carry_device_ids_steps_and_features():
    fleet = Fleet(FleetSpec(devices=3, features=2))
    first, second = fleet.next_round(), fleet.next_round()
    assert [r.device_id for r in first] == ["sensor-00000", "sensor-00001", "sensor-00002"]
    assert {r.step for r in first} == {0} and {r.step for r in second} == {1}
    assert all(len(r.values) == 2 and all(isinstance(v, float) for v in r.values) for r in first)


def test_history_shape_dtype_and_determinism():
    spec = FleetSpec(devices=7, features=3, seed=2)
    h = history(spec, 50)
    assert h.shape == (7, 50, 3) and h.dtype == np.float32
    assert np.isfinite(h).all() and (h > 0).all()
    np.testing.assert_array_equal(h, history(spec, 50))
    assert history(spec, 0).shape == (7, 0, 3)
    with pytest.raises(ValueError):
        history(spec, -1)


def test_history_and_live_fleet_share_device_parameters():
    spec = FleetSpec(devices=40, features=2, period=48, noise=0.05, anomaly_rate=0.0)
    fleet = Fleet(spec)
    live, _ = rounds(fleet, 48)  # (48, devices, features): one simulated day, steps 0..47
    past = history(spec, 48)  # steps -48..-1: also one whole day
    # Same daily cycle per device: the per-device mean and spread over a day agree.
    np.testing.assert_allclose(past.mean(axis=1), live.mean(axis=0), rtol=0.02)
    np.testing.assert_allclose(past.std(axis=1), live.std(axis=0), rtol=0.1)
    # History is the clean signal plus noise of the documented size.
    clean = np.stack([fleet.clean(k) for k in range(-48, 0)], axis=1)
    residual = (past - clean) / (spec.noise * fleet.amplitude[:, None, :])
    assert abs(residual.mean()) < 0.05 and 0.9 < residual.std() < 1.1


def test_anomalies_appear_at_the_expected_rate_and_deviate():
    spec = FleetSpec(devices=200, features=2, seed=3, period=96, noise=0.05, anomaly_rate=0.01)
    fleet = Fleet(spec)
    amp = fleet.amplitude
    n_rounds = 200
    values, labels = rounds(fleet, n_rounds)
    clean = np.stack([fleet.clean(k) for k in range(n_rounds)])  # (rounds, devices, features)
    deviation = np.abs(values - clean) / amp  # in units of the daily amplitude

    starts = 0
    kinds_seen = set()
    labelled = 0
    for d in range(spec.devices):
        column = [labels[k][d] for k in range(n_rounds)]
        for kind, group in itertools.groupby(enumerate(column), key=lambda item: item[1]):
            steps = [k for k, _ in group]
            if kind is None:
                # Normal readings: within 6 noise standard deviations of the clean signal.
                assert (deviation[steps, d] < 6 * spec.noise).all()
                continue
            assert kind in ANOMALY_KINDS
            kinds_seen.add(kind)
            starts += 1  # back-to-back anomalies of one kind count once: a slight undercount
            labelled += len(steps)
            run = values[steps, d]  # (len, features)
            if kind == "spike":
                assert (deviation[steps, d] > 5.5).all()
            elif kind == "level_shift":
                assert (deviation[steps, d] > 3.5).all()
                assert len(steps) >= 5 or steps[-1] == n_rounds - 1
            else:
                # Stuck at 0, or at the reading before: every reading is 0 or repeats the last one.
                previous = values[[k - 1 for k in steps], d]
                assert ((run == 0) | (run == previous)).all(axis=-1).all()
    assert kinds_seen == set(ANOMALY_KINDS)
    readings = spec.devices * n_rounds
    # Anomalies start on readings that are not already anomalous; mean length (1 + 12.5 + 7.5) / 3.
    expected_starts = spec.anomaly_rate * (readings - labelled)
    assert 0.7 * expected_starts < starts < 1.3 * expected_starts
    expected_fraction = spec.anomaly_rate * 7 / (1 + spec.anomaly_rate * 7)
    assert 0.6 * expected_fraction < labelled / readings < 1.4 * expected_fraction


def test_no_anomalies_at_rate_zero_and_all_at_rate_one():
    _, quiet = rounds(Fleet(FleetSpec(devices=20, anomaly_rate=0.0)), 30)
    assert all(label is None for row in quiet for label in row)
    _, busy = rounds(Fleet(FleetSpec(devices=20, anomaly_rate=1.0)), 30)
    assert all(label is not None for row in busy for label in row)


def memory_producer() -> tuple[MemoryBroker, MemoryProducer]:
    broker = MemoryBroker()
    broker.create_topic("t", 3)
    return broker, MemoryProducer(broker)


def sent_messages(broker: MemoryBroker) -> list[tuple[bytes, bytes, list | None]]:
    return [(m.key, m.value, m.headers or None) for m in sorted(broker.messages("t"), key=lambda m: m.timestamp)]


def test_run_simulator_needs_a_stopping_condition():
    with pytest.raises(ValueError, match="duration_s or max_readings"):
        run_simulator(memory_producer()[1], "t", FleetSpec(devices=1), rate=10)


@pytest.mark.parametrize("rate", [float("nan"), float("inf"), float("-inf")])
def test_run_simulator_refuses_a_rate_that_is_not_finite(rate: float):
    with pytest.raises(ValueError, match="rate must be a finite number"):
        run_simulator(memory_producer()[1], "t", FleetSpec(devices=1), rate=rate, max_readings=1)


class FakeClock:
    """simulate's clock: sleeping moves it, and each reading of it by a microsecond (the pace, not
    the host's load, sets what the test sees; a loop that never sleeps still ends)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        self.now += 1e-6
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def time(self) -> float:
        return self.now


def test_run_simulator_reports_progress_and_paces(monkeypatch):
    monkeypatch.setattr(simulate, "time", FakeClock())
    broker, producer = memory_producer()
    reports: list[tuple[int, float]] = []
    summary = run_simulator(
        producer, "t", FleetSpec(devices=10), rate=2000, duration_s=0.5,
        progress=lambda sent, elapsed: reports.append((sent, elapsed)), progress_interval_s=0.1,
    )
    assert len(broker.messages("t")) == summary.readings == 1000 and not producer.closed
    sent, elapsed = zip(*reports)
    # Every progress_interval_s, to a chunk's wait (a round of 10 devices: 10 readings, 5 ms).
    assert elapsed == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.0051), reports
    assert sent == pytest.approx([200, 400, 600, 800], abs=20), reports  # 2000 readings/s


def test_run_simulator_never_runs_ahead_of_its_pace():
    broker, producer = memory_producer()
    reports: list[tuple[int, float]] = []
    summary = run_simulator(
        producer, "t", FleetSpec(devices=10), rate=2000, duration_s=0.3,
        progress=lambda sent, elapsed: reports.append((sent, elapsed)), progress_interval_s=0.05,
    )
    assert reports and len(broker.messages("t")) == summary.readings
    chunk = 10  # a round of the 10 devices, sent before the pace is checked
    assert all(sent <= 2000 * elapsed + chunk for sent, elapsed in reports), reports
    assert summary.readings <= 2000 * summary.seconds + chunk, summary


def test_run_simulator_reports_failed_deliveries_and_unacknowledged_sends(monkeypatch):
    broker, producer = memory_producer()
    broker.rejected_topics.add("t")
    with pytest.raises(SimulationError, match=r"topic 't': 5 of 5 sends failed, first: delivery to t failed") as failed:
        run_simulator(producer, "t", FleetSpec(devices=2), rate=0, max_readings=5)
    assert failed.value.failed == 5
    broker.rejected_topics.clear()
    broker.away = True  # flush never succeeds
    monkeypatch.setattr(simulate, "FLUSH_TIMEOUT_S", 0.0)
    with pytest.raises(SimulationError, match="not every send was acknowledged within 0 s"):
        run_simulator(producer, "t", FleetSpec(devices=2), rate=0, max_readings=5)


def test_run_simulator_turns_a_refused_send_into_a_simulation_error():
    class Refusing(MemoryProducer):
        def produce(self, topic, key, value, headers=None) -> None:
            raise KafkaClientError("produce: message too large")

    with pytest.raises(SimulationError, match="send failed after 0 readings: produce: message too large"):
        run_simulator(Refusing(MemoryBroker()), "t", FleetSpec(devices=2), rate=0, max_readings=5)


@pytest.mark.parametrize("kwargs, match", [({"message_format": "xml"}, "message_format"), ({"batch_rows": 0}, "batch_rows"),
                                           ({"message_format": "arrow", "batch_rows": 2.5}, "batch_rows")])
def test_run_simulator_refuses_bad_message_options(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        run_simulator(memory_producer()[1], "t", FleetSpec(devices=1), rate=10, max_readings=1, **kwargs)


class _Sent:
    def __init__(self, broker: MemoryBroker) -> None:
        self.messages = sent_messages(broker)


def simulated(spec: FleetSpec, max_readings: int, **kwargs) -> tuple[_Sent, object]:
    broker, producer = memory_producer()
    summary = run_simulator(producer, "t", spec, rate=0, max_readings=max_readings, **kwargs)
    return _Sent(broker), summary


def test_arrow_batch_messages_carry_the_fleets_readings_per_gateway(tmp_path):
    from streamer.records import ARROW_CONTENT_TYPE, ReadingDecoder
    from streamer.simulate import gateway_id

    spec = FleetSpec(devices=25, features=2, seed=4, anomaly_rate=0.05)
    producer, summary = simulated(spec, 63, message_format="arrow", batch_rows=10,
                                  labels_path=tmp_path / "labels.jsonl")
    # 25 devices in gateways of 10, 10 and 5; the last message is cut at the 63rd reading.
    assert [len(ReadingDecoder(2).decode_arrow(k, v).device_ids) for k, v, _ in producer.messages] == [10, 10, 5] * 2 + [10, 3]
    assert summary.readings == 63
    decoder = ReadingDecoder(2)
    gateway_of: dict[str, bytes] = {}
    device_ids, values = [], []
    for key, value, headers in producer.messages:
        assert headers == [("content-type", ARROW_CONTENT_TYPE)]
        rows = decoder.decode_arrow(key, value)
        for device in rows.device_ids:
            assert gateway_of.setdefault(device, key) == key  # a device is always sent under one key
        assert key == gateway_id(int(rows.device_ids[0].split("-")[1]) // 10).encode()
        assert len(set(rows.ts.tolist())) == 1
        device_ids += rows.device_ids
        values.append(rows.values)
    fleet = Fleet(spec)
    expected = [r for _ in range(3) for r in fleet.next_round()][:63]
    assert device_ids == [r.device_id for r in expected]
    assert np.concatenate(values).tobytes() == np.array([r.values for r in expected], dtype=np.float32).tobytes()
    labels = (tmp_path / "labels.jsonl").read_text().splitlines()
    assert len(labels) == summary.anomalies == sum(r.anomaly is not None for r in expected) > 0


def test_json_and_arrow_carry_the_same_readings():
    from streamer.records import ReadingDecoder

    spec = FleetSpec(devices=12, features=3, seed=1)
    decoded = {}
    for fmt in ("json", "arrow"):
        producer, _ = simulated(spec, 40, message_format=fmt, batch_rows=5)

        class Msg:
            def __init__(self, i, key, value, headers):
                self.topic, self.partition, self.offset, self.key, self.value, self.headers = "t", 0, i, key, value, headers

        batch = ReadingDecoder(3).decode([Msg(i, *m) for i, m in enumerate(producer.messages)])
        assert not batch.dead_letters
        decoded[fmt] = batch.readings
    assert decoded["json"].device_ids == decoded["arrow"].device_ids and len(decoded["json"]) == 40
    assert decoded["json"].values.tobytes() == decoded["arrow"].values.tobytes()


def test_simulate_command_passes_the_message_format(monkeypatch):
    import streamer.kafka
    from streamer import cli, simulate

    calls = []
    producers: list[MemoryProducer] = []
    monkeypatch.setattr(streamer.kafka, "open_producer", lambda settings, **_: producers.append(MemoryProducer(MemoryBroker())) or producers[-1])
    monkeypatch.setattr(simulate, "run_simulator", lambda *a, **kw: calls.append(kw) or simulate.SimulationSummary(0, 0, 1, 0.0))
    base = ["simulate", "--max-readings", "5", "--progress-interval", "0"]
    assert cli.main([*base, "--format", "arrow", "--batch-rows", "7"]) == 0
    assert (calls[-1]["message_format"], calls[-1]["batch_rows"]) == ("arrow", 7)
    assert cli.main([*base, "--format", "arrow"]) == 0
    assert (calls[-1]["message_format"], calls[-1]["batch_rows"]) == ("arrow", simulate.DEFAULT_BATCH_ROWS)
    assert cli.main(base) == 0 and calls[-1]["message_format"] == "json"
    assert cli.main([*base, "--batch-rows", "7"]) == 2  # json has no batch rows
    assert len(producers) == 3 and all(p.closed for p in producers)  # none opened for a refused command
    with pytest.raises(SystemExit) as exited:
        cli.main([*base, "--format", "arrow", "--batch-rows", "0"])
    assert exited.value.code == 2
