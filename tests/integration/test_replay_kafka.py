"""`streamer replay` on a CSV equals `streamer run` fed the same readings through the real broker."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.csv as pacsv
import pytest

from streamer.cli import main
from streamer.model import ModelConfig, init_random_model, save_model_file
from streamer.settings import load_settings
from tests.integration.helpers import ServiceThread, create_topic, produce, read_topic

pytestmark = pytest.mark.kafka

N_DEVICES, N_READINGS = 20, 60
T0 = 1_700_000_000


def test_replay_equals_the_service_on_the_same_readings(kafka_bootstrap: str, unique: str, tmp_path, capsys):
    model = tmp_path / "model.pt"
    config = ModelConfig(input_size=1 + 2, hidden_size=8, num_layers=1, output_size=1,
                         time_features=("day",), device_norm_alpha=0.01)
    save_model_file(model, init_random_model(config, seed=9), config, "replay-vs-run")
    # One config file for both commands: they must read model, state and anomaly settings alike.
    settings_file = tmp_path / "streamer.toml"
    settings_file.write_text(
        f'[model]\npath = "{model}"\ndevice = "cpu"\n[anomaly]\nthreshold = 0.99\nwarmup = 10\n')

    rng = np.random.default_rng(5)
    devices = [f"dev-{d:02d}" for d in range(N_DEVICES)]
    ts = {d: T0 + 600 * np.arange(N_READINGS) + int(rng.integers(0, 600)) for d in devices}
    values = {d: 1 + d_i % 3 + np.sin(np.arange(N_READINGS) / 4) + rng.normal(scale=0.05, size=N_READINGS)
              for d_i, d in enumerate(devices)}
    for d in devices[::4]:
        values[d][40:45] += 10.0  # a jump after the warm-up, so that both flag something

    topics = {name: f"replay-{name}-{unique}" for name in ("in", "out", "dlq")}
    create_topic(kafka_bootstrap, topics["in"], partitions=3)  # keyed by device: per-device order holds
    order = sorted((int(ts[d][t]), d, t) for d in devices for t in range(N_READINGS))
    produce(kafka_bootstrap, topics["in"], [
        (d.encode(), json.dumps({"device_id": d, "ts": float(ts[d][t]), "values": [float(values[d][t])]}).encode(), None)
        for _, d, t in order])
    settings = load_settings({
        "kafka": {"bootstrap_servers": kafka_bootstrap, "input_topic": topics["in"], "output_topic": topics["out"],
                  "dead_letter_topic": topics["dlq"], "group_id": f"g-replay-{unique}"},
        "batch": {"max_records": 64, "max_wait_ms": 20},
        "checkpoint": {"directory": tmp_path / "checkpoints"},
        "metrics": {"enabled": False},
        "run": {"status_interval_s": 0},
    }, settings_file)
    service = ServiceThread(settings)
    try:
        records = read_topic(kafka_bootstrap, topics["out"], N_DEVICES * N_READINGS, timeout_s=120)
    finally:
        service.stop()
    assert len(records) == N_DEVICES * N_READINGS
    live = {}
    for record in records:
        body = json.loads(record.value)
        live[(body["device_id"], body["ts"])] = body

    data = tmp_path / "readings.csv"
    data.write_text("device_id,timestamp,value\n" + "".join(
        f"{d},{float(ts[d][t])!r},{float(np.float32(values[d][t]))!r}\n" for d in devices for t in range(N_READINGS)))
    out = tmp_path / "replayed.csv"
    assert main(["replay", "--data", str(data), "--out", str(out), "--config", str(settings_file), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["readings"] == N_DEVICES * N_READINGS

    replayed = pacsv.read_csv(out).to_pydict()
    assert len(replayed["ts"]) == len(live)
    keys = list(zip(replayed["device_id"], replayed["ts"]))
    assert set(keys) == set(live)
    got = {name: np.array([live[k][name] for k in keys]) for name in ("residual", "anomaly_score", "is_anomaly")}
    forecast = np.array([live[k]["forecast"][0] for k in keys])
    np.testing.assert_allclose(np.array(replayed["forecast_value"]), forecast, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.array(replayed["residual"]), got["residual"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.array(replayed["anomaly_score"]), got["anomaly_score"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.array(replayed["is_anomaly"]), got["is_anomaly"])
    assert got["is_anomaly"].sum() > 0
