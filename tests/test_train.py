"""Training: inputs as the engine computes them, validation by time, early stopping, the model
file's meta, and `streamer train` on CSV, Parquet and simulated history."""

import json
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.cli import main
from streamer.errors import StreamerError
from streamer.features import normalize_sequences, time_features
from streamer.history import write_table
from streamer.model import ModelConfig, Normalization, load_model_file
from streamer.simulate import FleetSpec, history
from streamer.train import (
    SIM_END_TS,
    TrainingDataError,
    TrainOptions,
    TrainOptionsError,
    _validation_loss,
    _validation_windows,
    check_output_path,
    model_inputs,
    save,
    simulated_series,
    train_model,
)

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
SMALL = TrainOptions(hidden_size=16, num_layers=1, window=32, batch_size=32, progress=False)
TINY = ["--hidden-size", "8", "--num-layers", "1", "--window", "16", "--epochs", "1", "--no-progress"]


def daily_sine(devices: int = 6, days: int = 4, noise: float = 0.02, seed: int = 0) -> list[tuple]:
    """Per device a daily sine with its own level, amplitude and phase, a reading every 5 min."""
    rng = np.random.default_rng(seed)
    ts = T0 + 300.0 * np.arange(days * 288)
    out = []
    for _ in range(devices):
        base, amp, phase = rng.uniform(10, 50), rng.uniform(2, 10), rng.uniform(0, 2 * np.pi)
        values = base + amp * (np.sin(2 * np.pi * ts / 86_400 + phase) + noise * rng.standard_normal(len(ts)))
        out.append((ts, values[:, None].astype(np.float32)))
    return out


@pytest.fixture(scope="module")
def sine_series():
    return daily_sine()


@pytest.fixture(scope="module")
def sine_trained(sine_series):
    return train_model(sine_series, replace(SMALL, epochs=30, patience=5, time_features=("day", "week")))


def test_daily_sine_reaches_a_low_validation_loss(sine_trained):
    r = sine_trained
    assert r.val_loss is not None and r.val_loss < 0.02  # a zero forecast scores ~1
    assert r.val_loss == min(e.val_loss for e in r.epoch_losses)
    assert r.epoch_losses[r.best_epoch - 1].val_loss == r.val_loss
    assert r.config == ModelConfig(5, 16, 1, 1, ("day", "week"), 0.001)
    assert r.normalization is None and not r.model.training
    # validation: the last 20% of the time range, for every device
    first, last = T0, T0 + 300.0 * (4 * 288 - 1)
    assert (r.data.first_ts, r.data.last_ts) == (first, last)
    assert r.data.cutoff_ts == pytest.approx(first + 0.8 * (last - first))
    before = int(np.sum(T0 + 300.0 * np.arange(4 * 288) < r.data.cutoff_ts))  # per device
    assert (r.data.devices, r.data.train_readings, r.data.val_readings) == (6, 6 * before, 6 * (4 * 288 - before))


def test_model_file_records_the_training(tmp_path: Path, sine_trained, sine_series):
    path = tmp_path / "model.pt"
    save(sine_trained, path, "sine-1", {"source": "daily_sine"})
    bundle = load_model_file(path)
    assert bundle.version == "sine-1" and bundle.config == sine_trained.config and bundle.normalization is None
    meta = bundle.meta
    assert meta["data"]["first"] == "2023-11-14T22:13:20+00:00"
    assert meta["data"]["last"] == datetime.fromtimestamp(sine_trained.data.last_ts, timezone.utc).isoformat()
    assert meta["data"]["devices"] == 6
    assert meta["data"]["train_readings"] + meta["data"]["val_readings"] == 6 * 4 * 288
    assert meta["val_loss"] == sine_trained.val_loss and meta["train_loss"] == sine_trained.train_loss
    assert (meta["best_epoch"], meta["epochs_run"]) == (sine_trained.best_epoch, sine_trained.epochs_run)
    assert meta["options"] == sine_trained.options.to_dict()
    assert meta["options"]["time_features"] == ["day", "week"] and meta["options"]["window"] == 32
    assert meta["source"] == "daily_sine" and meta["seconds"] > 0
    assert meta["threads"] == sine_trained.threads == 1  # hidden 16: one thread (it had not been recorded)
    x = torch.from_numpy(model_inputs(sine_series[:1], bundle.config)[0][None, :50])
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x)[0], sine_trained.model(x)[0])
    with pytest.raises(ValueError, match="clash"):
        save(sine_trained, path, "sine-1", {"val_loss": 0})


def test_inputs_are_the_engines_device_normalisation_and_time_features(sine_series):
    series = [(ts[: 300 + 50 * i], values[: 300 + 50 * i]) for i, (ts, values) in enumerate(sine_series[:3])]
    config = ModelConfig(5, 8, 1, 1, ("day", "week"), 0.01)
    inputs = model_inputs(series, config)
    expected_z = normalize_sequences([values for _, values in series], 0.01)
    for (ts, _), x, z in zip(series, inputs, expected_z):
        assert x.dtype == np.float32 and x.shape == (len(ts), 5)
        np.testing.assert_array_equal(x[:, :1], z)
        np.testing.assert_array_equal(x[:, 1:], time_features(ts, ("day", "week")))


def test_the_engine_streams_the_residuals_training_fitted(tmp_path: Path, sine_trained, sine_series):
    from streamer.engine import Engine, ReadingBatch

    path = tmp_path / "model.pt"
    save(sine_trained, path, "sine-1")
    bundle = load_model_file(path)
    series = [(ts[:200], values[:200]) for ts, values in sine_series[:2]]
    engine = Engine.build(bundle, capacity=4, device="cpu")
    streamed = np.zeros((2, 200), np.float32)
    for t in range(200):  # both devices' reading t in one batch
        batch = ReadingBatch(["a", "b"], np.array([ts[t] for ts, _ in series]), np.stack([v[t] for _, v in series]))
        streamed[:, t] = engine.step(batch, now=float(series[0][0][t]))[0].residual
    for i, x in enumerate(model_inputs(series, bundle.config)):
        with torch.no_grad():
            forecast = bundle.model.fc(bundle.model.lstm(torch.from_numpy(x[None]))[0])[0].numpy()
        np.testing.assert_allclose(streamed[i, 1:], np.abs(x[1:, 0] - forecast[:-1, 0]), atol=1e-5)


def test_inputs_with_global_or_no_normalisation(sine_series):
    ts, values = sine_series[0]
    norm = Normalization(torch.tensor([30.0]), torch.tensor([4.0]))
    (x,) = model_inputs([(ts, values)], ModelConfig(1, 8, 1, 1), norm)
    np.testing.assert_array_equal(x, (values - np.float32(30)) / np.float32(4))
    (raw,) = model_inputs([(ts, values)], ModelConfig(3, 8, 1, 1, ("day",)))
    np.testing.assert_array_equal(raw[:, :1], values)


def test_global_normalisation_comes_from_the_training_readings_only(sine_series):
    r = train_model(sine_series, replace(SMALL, epochs=1, normalization="global"))
    before = [values[ts < r.data.cutoff_ts] for ts, values in sine_series]
    data = np.concatenate(before).astype(np.float64)
    assert r.config.device_norm_alpha is None
    assert r.options.to_dict()["norm_alpha"] is None  # unused: not recorded as if it were
    assert replace(SMALL, normalization="device").to_dict()["norm_alpha"] == SMALL.norm_alpha
    torch.testing.assert_close(r.normalization.mean, torch.tensor(data.mean(0), dtype=torch.float32))
    torch.testing.assert_close(r.normalization.std, torch.tensor(data.std(0), dtype=torch.float32))


def test_a_feature_constant_while_training_gets_a_std_relative_to_its_level():
    # Constant at 1e6 while training: std 1e-6 had made a change of 1 an input of 1e6 (and a
    # residual at RESIDUAL_CAP); floored at REL_STD_FLOOR of the level, as device normalisation is.
    from streamer.train import _global_normalization

    norm = _global_normalization([np.array([[1e6, 0.0, 5.0]] * 100 + [[1e6, 0.0, 7.0]] * 100)])
    assert norm.std.tolist() == pytest.approx([100.0, 1e-6, 1.0])
    assert norm.mean.tolist() == pytest.approx([1e6, 0.0, 6.0])


def test_early_stopping_keeps_the_best_epoch():
    rng = np.random.default_rng(5)
    ts = T0 + 60.0 * np.arange(2000)
    noise = [(ts, rng.standard_normal((2000, 1)).astype(np.float32)) for _ in range(4)]  # nothing to learn
    options = replace(SMALL, epochs=50, patience=1, normalization="none", lr=0.05)
    r = train_model(noise, options)
    assert r.epochs_run < 50
    vals = [e.val_loss for e in r.epoch_losses]
    assert r.best_epoch == r.epochs_run - 1  # patience 1: the epoch after the best one stops
    assert vals[-1] >= r.val_loss == min(vals)
    # the returned weights are the best epoch's: recompute its validation loss
    inputs = model_inputs(noise, r.config)
    val_pieces = [x[ts >= r.data.cutoff_ts] for x in inputs]
    assert _validation_loss(r.model, *_validation_windows(val_pieces, options.window), 1) == pytest.approx(r.val_loss)


def test_validation_covers_every_transition_once_in_shorter_windows_when_needed():
    pieces = [np.arange(10, dtype=np.float32)[:, None], np.arange(1, dtype=np.float32)[:, None],
              np.arange(4, dtype=np.float32)[:, None]]
    windows, mask = _validation_windows(pieces, 4)
    assert windows.shape == (4, 5, 1) and int(mask.sum()) == 9 + 3
    targets = sorted(windows[:, 1:, 0][mask].tolist())
    assert targets == sorted(list(range(1, 10)) + [1, 2, 3])
    short, short_mask = _validation_windows([np.zeros((3, 2), np.float32)], 64)
    assert short.shape == (1, 3, 2) and short_mask.all()
    assert _validation_windows([np.zeros((1, 1), np.float32)], 8) is None


def test_no_validation_readings_trains_all_epochs_with_a_warning(sine_series, caplog):
    r = train_model(sine_series, replace(SMALL, epochs=3, val_fraction=0.0))
    assert r.val_loss is None and r.data.cutoff_ts is None and r.data.val_readings == 0
    assert (r.epochs_run, r.best_epoch) == (3, 3)
    # one reading after the cutoff per device: nothing to validate
    ts = T0 + 300.0 * np.arange(100)
    lonely = [(np.append(ts, T0 + 1e6), np.zeros((101, 1), np.float32))]
    r = train_model(lonely, replace(SMALL, epochs=2, val_fraction=0.1))
    assert r.val_loss is None and r.data.val_readings == 1 and r.epochs_run == 2
    assert "no validation" in caplog.text


def test_epoch_covers_the_training_readings_once(sine_series):
    r = train_model(sine_series, replace(SMALL, epochs=2))
    windows = -(-r.data.train_readings // 32)
    assert r.steps == 2 * -(-windows // 32)


def test_training_is_deterministic_per_seed(sine_series):
    a = train_model(sine_series, replace(SMALL, epochs=2, seed=3))
    b = train_model(sine_series, replace(SMALL, epochs=2, seed=3))
    assert a.epoch_losses == b.epoch_losses
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key])


def test_time_budget_stops_after_one_step(sine_series):
    r = train_model(sine_series, replace(SMALL, epochs=100, time_budget_s=0.0))
    assert r.steps == 1 and r.epochs_run == 1


def test_simulated_series_have_real_timestamps():
    spec = FleetSpec(devices=3, seed=1)
    series = simulated_series(spec, 10)
    ts = series[0][0]
    np.testing.assert_array_equal(ts, SIM_END_TS - 300.0 * np.arange(10, 0, -1))
    np.testing.assert_array_equal(np.stack([v for _, v in series]), history(spec, 10))


@pytest.mark.parametrize(
    "series, message",
    [
        ([], "no series"),
        ([(np.arange(5.0), np.ones(5))], "series 0 must be ts"),
        ([(np.arange(5.0), np.ones((4, 1)))], "series 0 must be ts"),
        ([(np.arange(5.0), np.ones((5, 1))), (np.arange(5.0), np.ones((5, 2)))], "series 1 has 2 values"),
        ([(np.arange(5.0), np.array([[1.0], [np.nan]] * 2 + [[1.0]]))], "series 0 has non-finite"),
        ([(np.array([1.0, 3.0, 2.0]), np.ones((3, 1)))], "series 0 is not in time order.*got 2"),
        ([(np.arange(20.0), np.ones((20, 1)))], "window \\+ 1 = 33 readings.*got 16"),
    ],
)
def test_malformed_series(series, message):
    with pytest.raises(TrainingDataError, match=message):
        train_model(series, SMALL)


@pytest.mark.parametrize(
    "field, value",
    [("window", 0), ("epochs", 1.5), ("lr", 0.0), ("val_fraction", 1.0), ("norm_alpha", 2.0),
     ("normalization", "zscore"), ("time_features", ("month",)), ("device", "tpu"), ("patience", 0)],
)
def test_bad_options_name_the_field(field, value):
    with pytest.raises(TrainOptionsError, match=field):
        replace(SMALL, **{field: value})


def test_check_output_path(tmp_path: Path):
    check_output_path(tmp_path / "m.pt")
    for bad, why in [(tmp_path / "missing" / "m.pt", "does not exist"), (tmp_path, "is a directory")]:
        with pytest.raises(StreamerError, match=why) as info:
            check_output_path(bad)
        assert str(bad) in str(info.value)


# --- streamer train ----------------------------------------------------------------------------


def write_long_csv(path: Path, series, devices=("a", "b")) -> Path:
    ts = np.concatenate([s[0] for s in series])
    write_table(path, {"device_id": np.repeat(np.array(devices, dtype=object), [len(s[0]) for s in series]),
                       "timestamp": ts, "value": np.concatenate([s[1][:, 0] for s in series])})
    return path


def test_cli_out_into_a_missing_directory_exits_at_once(tmp_path: Path, capsys):
    out = tmp_path / "nowhere" / "m.pt"
    started = time.monotonic()
    assert main(["train", "--out", str(out), "--data", str(tmp_path / "absent.csv")]) == 2
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "absent.csv" not in err[0]


def test_cli_trains_on_csv_and_on_a_parquet_directory(tmp_path: Path, capsys, sine_series):
    csv_path = write_long_csv(tmp_path / "long.csv", sine_series[:2])
    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    for i, (ts, values) in enumerate(sine_series[:2]):
        write_table(parquet_dir / f"dev{i}.parquet", {"timestamp": ts, "value": values[:, 0]})
    for data, devices in [(csv_path, ["a", "b"]), (parquet_dir, ["dev0", "dev1"])]:
        out = tmp_path / f"{data.stem}.pt"
        assert main(["train", "--data", str(data), "--out", str(out), "--time-features", "day", *TINY]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["model"] == str(out) and summary["epochs"] == 1 and summary["val_loss"] is not None
        assert set(summary) == {"model", "version", "loss", "val_loss", "best_epoch", "epochs", "seconds"}
        bundle = load_model_file(out)
        assert bundle.config.time_features == ("day",) and bundle.meta["source"] == str(data)
        assert bundle.meta["data"]["devices"] == len(devices)


def test_cli_bad_rows_are_refused_or_skipped_with_file_and_line(tmp_path: Path, capsys, sine_series):
    path = write_long_csv(tmp_path / "long.csv", sine_series[:2])
    lines = path.read_text().splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0] + ",warm"  # file line 5
    lines[9] = lines[9].split(",", 1)[0] + ",yesterday," + lines[9].rsplit(",", 1)[1]  # file line 10
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "m.pt"
    assert main(["train", "--data", str(path), "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"{path} line 5" in err and "warm" in err and not out.exists()
    assert main(["train", "--csv", str(path), "--on-bad", "skip", "--out", str(out), *TINY]) == 0
    err = capsys.readouterr().err
    assert f"{path}:5: unparsable value (warm)" in err
    assert f"{path}:10: unparsable timestamp (yesterday)" in err
    assert "skipped 2 bad row(s)" in err
    assert load_model_file(out).meta["bad_rows_skipped"] == 2


def test_cli_trains_on_simulated_history(tmp_path: Path, capsys):
    out = tmp_path / "sim.pt"
    args = ["train", "--out", str(out), "--devices", "4", "--history", "300", "--time-features", "none", *TINY]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["version"].startswith("lstm-h8-l1-device-sim4x300-e")
    meta = load_model_file(out).meta
    assert meta["source"] == "simulated" and meta["data"]["last"] == "2023-12-31T23:55:00+00:00"


@pytest.mark.parametrize(
    "flag, value",
    [("--val-fraction", "1"), ("--norm-alpha", "0"), ("--time-features", "month"), ("--window", "0"),
     ("--normalization", "zscore"), ("--lr", "-1")],
)
def test_cli_bad_values_exit_2(tmp_path: Path, capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "m.pt"), flag, value])
    assert info.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("extra, flag", [(["--value-columns", "nosuchcol"], "--value-columns"),
                                         (["--on-bad", "skip"], "--on-bad")])
def test_options_of_the_history_file_are_refused_without_one(tmp_path, capsys, extra, flag):
    # Without --data the history is simulated: these had been dropped without a word (exit 0).
    from streamer.cli import main

    assert main(["train", "--out", str(tmp_path / "m.pt"), "--devices", "2", "--history", "60", "--epochs", "1",
                 *extra]) == 2
    assert capsys.readouterr().err == (f"streamer: error: {flag} reads the history of --data: without --data,"
                                       " history is simulated\n")
    assert not (tmp_path / "m.pt").exists()


def test_the_threads_used_are_recorded_and_can_be_chosen(tmp_path: Path, capsys):
    # The same seed gives other weights on another thread count: hosts with other core counts had
    # trained other models from one command, and the model file did not say with how many.
    from streamer.train import _default_threads

    series = daily_sine(devices=2, days=1)
    wide = train_model(series, replace(SMALL, hidden_size=72, epochs=1))
    assert wide.threads == _default_threads(72)
    out = tmp_path / "m.pt"
    assert main(["train", "--out", str(out), "--devices", "2", "--history", "60", "--threads", "2", *TINY]) == 0
    assert load_model_file(out).meta["threads"] == 2 and load_model_file(out).meta["options"]["threads"] == 2
    assert load_model_file(out).meta["options"]["ttl_seconds"] == 86400.0
    assert main(["train", "--out", str(out), "--devices", "2", "--history", "60", "--state-ttl-seconds", "none",
                 *TINY]) == 0
    assert load_model_file(out).meta["options"]["ttl_seconds"] is None
    with pytest.raises(SystemExit) as refused:
        main(["train", "--out", str(out), "--threads", "0", *TINY])
    assert refused.value.code == 2
    capsys.readouterr()
    # 16384 threads had ended in libgomp's "Thread creation failed" (exit 1), 100000 in a crash (139)
    assert main(["train", "--out", str(out), "--threads", "1025", *TINY]) == 2
    assert capsys.readouterr().err.strip().endswith("threads must be None or an int in [1, 1024], got 1025")


def test_inputs_too_large_for_float32_training_are_named_not_blamed_on_the_lr():
    # Raw values near the 1e18 the decoders allow: the loss overflows float32 whatever the lr, and
    # the error had said "try a smaller lr" (1e-9 too).
    rng = np.random.default_rng(0)
    ts = T0 + 60.0 * np.arange(400)
    values = (9e17 + 1e16 * rng.standard_normal((400, 1))).astype(np.float32)
    too_large = "inputs reach .* under normalization 'none', too large for float32 training .*; use normalization 'device'"
    with pytest.raises(StreamerError, match=too_large):
        train_model([(ts, values)], replace(SMALL, normalization="none", epochs=1, window=16, lr=1e-9))
    # Where the loss stays finite (about 4e35 here), a model was written as if trained.
    steps = (1e18 * (1 + np.arange(400) % 7) / 7).astype(np.float32)[:, None]
    with pytest.raises(StreamerError, match=too_large):
        train_model([(ts, steps)], replace(SMALL, normalization="none", epochs=1, window=8))


def test_training_cuts_a_series_where_the_engine_would_evict_the_device(tmp_path: Path, sine_trained):
    # Idle past state.ttl_seconds, a device is evicted and starts again from zero state and a
    # fresh running normalisation; normalised straight through the gap, training had fitted
    # inputs the engine never computes (forecasts 1.1 apart after a 2-day gap).
    from streamer.engine import Engine, ReadingBatch
    from streamer.train import split_at_gaps

    path = tmp_path / "model.pt"
    save(sine_trained, path, "sine-1")
    bundle = load_model_file(path)
    ts, values = daily_sine(devices=1, days=2)[0]
    ts = ts.copy()
    ts[150:] += 2 * 86_400.0  # a gap of two days after reading 149
    engine = Engine.build(bundle, capacity=4, device="cpu", ttl_seconds=86_400.0)
    streamed = np.array([engine.step(ReadingBatch(["a"], ts[t:t + 1], values[t:t + 1]), now=float(ts[t]))[0].residual[0]
                         for t in range(300)])
    pieces = split_at_gaps([(ts[:300], values[:300])], 86_400.0)
    assert [len(p[0]) for p in pieces] == [150, 150]
    for start, x in zip((0, 150), model_inputs(pieces, bundle.config)):
        with torch.no_grad():
            forecast = bundle.model.fc(bundle.model.lstm(torch.from_numpy(x[None]))[0])[0].numpy()
        np.testing.assert_allclose(streamed[start + 1:start + 150], np.abs(x[1:, 0] - forecast[:-1, 0]), atol=1e-5)
    whole = model_inputs([(ts[:300], values[:300])], bundle.config)[0]
    assert not np.allclose(whole[150:], model_inputs(pieces, bundle.config)[1])  # what training had fitted
    # Training splits the same way: one series with the gap trains as its two pieces do.
    options = replace(SMALL, epochs=1, window=16, val_fraction=0.0)
    one = train_model([(ts, values)], options)
    two = train_model(split_at_gaps([(ts, values)], 86_400.0), options)
    assert one.data.devices == 1 and two.data.devices == 2 and one.train_loss == two.train_loss
    for a, b in zip(one.model.state_dict().values(), two.model.state_dict().values()):
        assert torch.equal(a, b)


def test_series_cut_to_pieces_by_the_ttl_say_so_when_no_piece_is_long_enough(tmp_path: Path, capsys):
    # Daily readings a little late: with the default TTL of a day every reading starts the
    # device again, in the engine as in training; the error had blamed the window alone.
    ts = T0 + 86_430.0 * np.arange(100)
    values = np.sin(np.arange(100, dtype=np.float32))[:, None]
    with pytest.raises(TrainingDataError, match=r"cut at 99 gaps longer than ttl_seconds = 86400 s.*--state-ttl-seconds"):
        train_model([(ts, values)], replace(SMALL, epochs=1, window=16))
    assert train_model([(ts, values)], replace(SMALL, epochs=1, window=16, ttl_seconds=2 * 86_400.0)).data.devices == 1
