"""The simulated fleet: deterministic per seed, the same process in history and live, labelled anomalies."""

import itertools

import numpy as np
import pytest

from streamer.simulate import ANOMALY_KINDS, Fleet, FleetSpec, history, run_simulator


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


def test_run_simulator_needs_a_stopping_condition():
    with pytest.raises(ValueError, match="duration_s or max_readings"):
        run_simulator("127.0.0.1:1", "t", FleetSpec(devices=1), rate=10)


class _FakeFuture:
    def add_errback(self, callback) -> None:
        pass


class _FakeProducer:
    """kafka.KafkaProducer's surface run_simulator uses; keeps what it was given."""

    made: list["_FakeProducer"] = []

    def __init__(self, **config) -> None:
        self.config = config
        self.sent = 0
        _FakeProducer.made.append(self)

    def send(self, topic, key, value) -> _FakeFuture:
        self.sent += 1
        return _FakeFuture()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("rate", [float("nan"), float("inf"), float("-inf")])
def test_run_simulator_refuses_a_rate_that_is_not_finite(rate: float):
    with pytest.raises(ValueError, match="rate must be a finite number"):
        run_simulator("127.0.0.1:1", "t", FleetSpec(devices=1), rate=rate, max_readings=1)


def test_run_simulator_reports_progress_and_passes_the_producer_config(monkeypatch):
    import kafka

    monkeypatch.setattr(kafka, "KafkaProducer", _FakeProducer)
    reports: list[tuple[int, float]] = []
    summary = run_simulator(
        "127.0.0.1:1", "t", FleetSpec(devices=10), rate=2000, duration_s=0.5,
        producer_config={"security_protocol": "SSL"},
        progress=lambda sent, elapsed: reports.append((sent, elapsed)), progress_interval_s=0.1,
    )
    producer = _FakeProducer.made[-1]
    assert producer.config["security_protocol"] == "SSL" and producer.sent == summary.readings
    assert 3 <= len(reports) <= 6, reports
    sent, elapsed = zip(*reports)
    assert list(sent) == sorted(sent) and 0 < sent[0] and sent[-1] <= summary.readings
    assert all(b - a > 0.05 for a, b in zip(elapsed, elapsed[1:]))
    # About the pace asked: 2000 readings/s.
    assert all(abs(s / e - 2000) < 400 for s, e in reports), reports
