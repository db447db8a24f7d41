"""Training on simulated history; the trained model streams and round-trips through the model file."""

from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.model import load_model_file
from streamer.simulate import FleetSpec, history
from streamer.train import TrainingDataError, load_csv, save, train_model

SMALL = dict(hidden_size=16, num_layers=1, seq_len=32, batch_size=32)


@pytest.fixture(scope="module")
def fleet_history() -> list[np.ndarray]:
    return list(history(FleetSpec(devices=24, features=1, seed=1, period=48), 240))


@pytest.fixture(scope="module")
def trained(fleet_history):
    return train_model(fleet_history, steps=60, seed=0, **SMALL)


def test_training_reduces_the_loss(trained):
    assert trained.steps == 60
    assert trained.loss_last < 0.5 * trained.loss_first
    assert not trained.model.training


def test_normalization_is_per_feature_mean_and_std(fleet_history, trained):
    data = np.concatenate(fleet_history)
    torch.testing.assert_close(trained.normalization.mean, torch.tensor(data.mean(0)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(trained.normalization.std, torch.tensor(data.std(0)), rtol=1e-4, atol=1e-4)


def test_training_is_deterministic_per_seed(fleet_history):
    a = train_model(fleet_history, steps=5, seed=3, **SMALL)
    b = train_model(fleet_history, steps=5, seed=3, **SMALL)
    assert a.loss_last == b.loss_last
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key])


def test_saved_model_loads_with_normalization(tmp_path: Path, fleet_history, trained):
    path = tmp_path / "model.pt"
    save(trained, path, "sim-1")
    bundle = load_model_file(path)
    assert bundle.version == "sim-1" and bundle.config == trained.config
    assert bundle.normalization is not None
    torch.testing.assert_close(bundle.normalization.mean, trained.normalization.mean)
    torch.testing.assert_close(bundle.normalization.std, trained.normalization.std)
    x = (torch.from_numpy(fleet_history[0][None, :50]) - bundle.normalization.mean) / bundle.normalization.std
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x)[0], trained.model(x)[0])


def test_time_budget_stops_early(fleet_history):
    result = train_model(fleet_history, steps=10_000, time_budget_s=0.0, **SMALL)
    assert result.steps == 1


def test_short_sequences_are_skipped_and_none_long_enough_is_an_error(fleet_history):
    short = np.ones((10, 1), dtype=np.float32)
    result = train_model([short, fleet_history[0]], steps=2, **SMALL)
    assert result.steps == 2
    with pytest.raises(TrainingDataError, match="seq_len \\+ 1 = 33.*got 10") as info:
        train_model([short, short], steps=2, **SMALL)
    assert info.value.value == 10


@pytest.mark.parametrize(
    "sequences, message",
    [
        ([], "no sequences"),
        ([np.ones(100, dtype=np.float32)], "sequence 0 must be a \\(T, F\\)"),
        ([np.ones((100, 1)), np.ones((100, 2))], "sequence 1 has 2 features"),
        ([np.array([[1.0], [np.nan]] * 50)], "sequence 0 has non-finite"),
    ],
)
def test_malformed_sequences(sequences, message):
    with pytest.raises(TrainingDataError, match=message):
        train_model(sequences, steps=1, **SMALL)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "readings.csv"
    path.write_text(text)
    return path


def test_load_csv_groups_and_sorts_by_timestamp(tmp_path: Path):
    path = write(
        tmp_path,
        "value,site,device_id,timestamp\n"
        "3.0,x,a,1700000120\n"
        "1.5,x,b,2023-11-14T22:13:20Z\n"
        "1.0,x,a,1700000000\n"
        "2.5,y,b,2023-11-14T22:15:20+00:00\n"
        "2.0,x,a,2023-11-14T22:14:20\n",  # naive ISO is UTC: 1700000060
    )
    data = load_csv(path)
    assert list(data) == ["a", "b"]
    assert data["a"].dtype == np.float32 and data["a"].shape == (3, 1)
    np.testing.assert_array_equal(data["a"][:, 0], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(data["b"][:, 0], [1.5, 2.5])


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("device_id,value\na,1\n", 1, "missing column.*timestamp"),
        ("device_id,timestamp,value\na,1,1\na,2,warm\n", 3, "unparsable value.*'warm'"),
        ("device_id,timestamp,value\na,1,1\na,yesterday,2\n", 3, "unparsable timestamp.*'yesterday'"),
        ("device_id,timestamp,value\na,1,nan\n", 2, "non-finite value.*'nan'"),
        ("device_id,timestamp,value\na,1,inf\n", 2, "non-finite value"),
        ("device_id,timestamp,value\na,1,1\na,2\n", 3, "too few fields"),
        ("device_id,timestamp,value\n,1,1\n", 2, "empty device_id"),
    ],
)
def test_load_csv_errors_name_file_and_line(tmp_path: Path, text: str, line: int, message: str):
    path = write(tmp_path, text)
    with pytest.raises(TrainingDataError, match=message) as info:
        load_csv(path)
    assert f"{path} line {line}:" in str(info.value)
    assert info.value.path == path and info.value.line == line


def test_load_csv_missing_or_empty_file(tmp_path: Path):
    with pytest.raises(TrainingDataError, match="no such file"):
        load_csv(tmp_path / "absent.csv")
    with pytest.raises(TrainingDataError, match="no data rows"):
        load_csv(write(tmp_path, "device_id,timestamp,value\n"))
