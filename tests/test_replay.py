"""streamer replay: histories through the engine in time order equal the engine stepped one
reading at a time per device; results tables round trip; plots; the CLI's checks and summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from streamer.anomaly import AnomalyParams
from streamer.cli import main
from streamer.engine import Engine, ReadingBatch
from streamer.history import Histories, load_histories
from streamer.model import ModelConfig, init_random_model, load_model_file, save_model_file
from streamer.replay import ReplayError, ReplayResult, plot_devices, plot_page, replay, safe_file_name
from tests.conftest import DEVICES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000.0
TTL = 4 * 3600.0
PARAMS = AnomalyParams(threshold=0.99, warmup=10)
PLAIN = ModelConfig(2, 8, 2, 2)
DAY_DEVICE_NORM = ModelConfig(input_size=1 + 2, hidden_size=8, num_layers=1, output_size=1,
                              time_features=("day",), device_norm_alpha=0.01)


def save_model(path: Path, config: ModelConfig, seed: int = 3) -> Path:
    save_model_file(path, init_random_model(config, seed), config, f"replay-test-{seed}")
    return path


def fleet(values_size: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Devices of different lengths and starts; readings every 10 min with jitter, some gaps
    longer than TTL (the device restarts) and some just shorter (it goes on); a spike each."""
    rng = np.random.default_rng(seed)
    out = {}
    for d in range(6):
        n = int(rng.integers(40, 120))
        steps = rng.uniform(300, 900, size=n)
        steps[rng.choice(np.arange(1, n), size=2, replace=False)] = [TTL + 3600, TTL - 600]
        ts = T0 + d * 7200 + np.cumsum(steps)
        level = 10.0 ** (d % 3)
        values = (level * (1 + 0.1 * np.sin(np.arange(n)[:, None] / 5 + np.arange(values_size)))
                  + rng.normal(scale=0.01 * level, size=(n, values_size)))
        values[n // 2 + 5] += 8 * level
        out[f"site-{d % 2}/dev-{d}"] = (ts, values.astype(np.float32))
    return out


def write_long_csv(path: Path, devices: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str], seed: int = 1) -> Path:
    """device_id,timestamp,<names> with the rows shuffled."""
    rows = [(d, t, v) for d, (ts, values) in devices.items() for t, v in zip(ts, values)]
    order = np.random.default_rng(seed).permutation(len(rows))
    lines = ["device_id,timestamp," + ",".join(names)]
    for i in order:
        d, t, v = rows[i]
        lines.append(f"{d},{float(t)!r}," + ",".join(repr(float(x)) for x in v))
    path.write_text("\n".join(lines) + "\n")
    return path


def stepped_alone(bundle, histories: Histories, ttl: float | None, device: str = "cpu") -> dict[str, dict[str, np.ndarray]]:
    """Each device on a fresh engine, one reading per step, now = the reading's timestamp."""
    out = {}
    for device_id, h in histories.devices.items():
        engine = Engine.build(bundle, capacity=4, device=device, ttl_seconds=ttl, anomaly=PARAMS)
        preds = [engine.step(ReadingBatch([device_id], h.ts[t : t + 1], h.values[t : t + 1]), now=float(h.ts[t]))[0]
                 for t in range(len(h.ts))]
        out[device_id] = {
            "forecast": np.concatenate([p.forecast for p in preds]),
            "residual": np.concatenate([p.residual for p in preds]),
            "anomaly_score": np.concatenate([p.anomaly_score for p in preds]),
            "surprise": np.concatenate([p.surprise for p in preds]),
            "is_anomaly": np.concatenate([p.is_anomaly for p in preds]),
        }
    return out


def assert_equal_to_stepped(result: ReplayResult, expected: dict, names: tuple[str, ...]) -> None:
    for device_id, want in expected.items():
        got = result.device(device_id)
        forecast = np.stack([got[f"forecast_{n}"] for n in names], axis=1)
        scale = float(np.abs(want["forecast"]).max())  # levels differ by 100x between devices
        np.testing.assert_allclose(forecast / scale, want["forecast"] / scale, atol=1e-5, rtol=0, err_msg=device_id)
        np.testing.assert_allclose(got["residual"], want["residual"], atol=1e-5, rtol=1e-5, err_msg=device_id)
        np.testing.assert_allclose(got["anomaly_score"], want["anomaly_score"], atol=1e-6, rtol=0, err_msg=device_id)
        np.testing.assert_allclose(got["surprise"], want["surprise"], atol=1e-3, rtol=1e-3, err_msg=device_id)
        np.testing.assert_array_equal(got["is_anomaly"], want["is_anomaly"], err_msg=device_id)


@pytest.mark.parametrize("config", [PLAIN, DAY_DEVICE_NORM], ids=["plain-2-values", "day+device-norm"])
@pytest.mark.parametrize("batch_size", [7, 4096])
@pytest.mark.parametrize("device", DEVICES)
def test_replay_equals_stepping_each_device_one_reading_at_a_time(tmp_path, config, batch_size, device):
    names = [f"v{k}" for k in range(config.values_size)]
    histories = load_histories(write_long_csv(tmp_path / "fleet.csv", fleet(config.values_size), names))
    bundle = load_model_file(save_model(tmp_path / "model.pt", config))
    engine = Engine.build(bundle, capacity=64, device=device, ttl_seconds=TTL, anomaly=PARAMS)

    result = replay(histories, engine, batch_size=batch_size, progress=False)

    expected = stepped_alone(bundle, histories, TTL, device)
    assert_equal_to_stepped(result, expected, tuple(names))
    # The data exercises what it should: restarts after a gap over TTL (residual 0 mid-series),
    # flags, and (batch 4096) one batch spanning days, which without care would evict every device.
    restarts = sum(int((want["residual"][1:] == 0).sum()) for want in expected.values())
    assert restarts == len(expected)
    assert result.flagged > 0
    assert result.evicted_ttl >= len(expected)


def test_a_device_without_readings_is_passed_over(tmp_path):
    """Histories built by hand (load_histories gives no empty device) may hold one with no readings."""
    from streamer.history import DeviceHistory

    histories = load_histories(write_long_csv(tmp_path / "fleet.csv", fleet(2), ["a", "b"]))
    empty = DeviceHistory("silent", np.zeros(0), np.zeros((0, 2), np.float32), "by hand", np.zeros(0, np.int64))
    for devices in ({**histories.devices, "silent": empty}, {"silent": empty, **histories.devices}):
        bundle = load_model_file(save_model(tmp_path / "model.pt", PLAIN))
        engine = Engine.build(bundle, capacity=64, device="cpu", ttl_seconds=TTL, anomaly=PARAMS)
        result = replay(Histories(devices, histories.value_columns), engine, batch_size=50, progress=False)
        assert len(result.columns["ts"]) == sum(len(h.ts) for h in histories.devices.values())


def test_without_ttl_no_device_restarts(tmp_path):
    histories = load_histories(write_long_csv(tmp_path / "fleet.csv", fleet(2), ["a", "b"]))
    bundle = load_model_file(save_model(tmp_path / "model.pt", PLAIN))
    engine = Engine.build(bundle, capacity=64, device="cpu", ttl_seconds=None, anomaly=PARAMS)
    result = replay(histories, engine, batch_size=50, progress=False)
    assert_equal_to_stepped(result, stepped_alone(bundle, histories, None), ("a", "b"))
    assert result.evicted_ttl == 0


def test_rows_grouped_by_device_in_time_order_from_a_shuffled_file(tmp_path):
    devices = fleet(2)
    histories = load_histories(write_long_csv(tmp_path / "fleet.csv", devices, ["a", "b"]))
    engine = Engine.build(load_model_file(save_model(tmp_path / "m.pt", PLAIN)), capacity=64, device="cpu")
    result = replay(histories, engine, batch_size=16, progress=False)

    assert list(result.columns) == ["device_id", "ts", "value_a", "value_b", "forecast_a", "forecast_b",
                                    "residual", "anomaly_score", "surprise", "is_anomaly"]
    assert len(result) == sum(len(ts) for ts, _ in devices.values())
    assert list(result.device_rows) == list(histories.devices)
    for device_id, (ts, values) in devices.items():
        rows = result.device_rows[device_id]
        np.testing.assert_array_equal(result.columns["ts"][rows], ts)
        np.testing.assert_array_equal(result.columns["value_b"][rows], values[:, 1])
        assert set(result.columns["device_id"][rows]) == {device_id}
    assert result.columns["anomaly_score"].dtype == np.float64 and result.columns["is_anomaly"].dtype == bool


def test_value_count_not_the_models_is_refused_naming_both(tmp_path):
    data = write_long_csv(tmp_path / "two.csv", fleet(2), ["a", "b"])
    model = save_model(tmp_path / "one-value.pt", DAY_DEVICE_NORM)
    engine = Engine.build(load_model_file(model), capacity=64, device="cpu")
    with pytest.raises(ReplayError, match=r"two\.csv has 2 value column\(s\) \['a', 'b'\].*one-value\.pt takes 1"):
        replay(load_histories(data), engine, progress=False)


@pytest.fixture(scope="module")
def small_result(tmp_path_factory) -> ReplayResult:
    tmp = tmp_path_factory.mktemp("replay")
    histories = load_histories(write_long_csv(tmp / "fleet.csv", fleet(2), ["a", "b"]))
    engine = Engine.build(load_model_file(save_model(tmp / "m.pt", PLAIN)), capacity=64, device="cpu",
                          ttl_seconds=TTL, anomaly=PARAMS)
    return replay(histories, engine, progress=False)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_results_round_trip(tmp_path, small_result, suffix):
    path = tmp_path / f"results{suffix}"
    small_result.write(path)
    table = pq.read_table(path) if suffix == ".parquet" else pacsv.read_csv(path)
    assert table.column_names == list(small_result.columns)
    for name, column in small_result.columns.items():
        back = np.asarray(table.column(name).to_pylist(), dtype=column.dtype)
        np.testing.assert_array_equal(back, column, err_msg=name)


def test_plots_are_pngs_named_after_devices(tmp_path, small_result):
    files = plot_devices(small_result, tmp_path / "plots")
    assert sorted(f.name for f in files) == sorted(f"{safe_file_name(d)}.png" for d in small_result.device_rows)
    for f in files:
        assert f.read_bytes()[:8] == PNG_MAGIC and f.stat().st_size > 5000
    assert {f.name for f in files} >= {"site-0__dev-0.png", "site-1__dev-5.png"}

    # at most max_devices, the most flagged first; unknown ids refused
    flags = {d: int(small_result.device(d)["is_anomaly"].sum()) for d in small_result.device_rows}
    top = plot_devices(small_result, tmp_path / "top", max_devices=2)
    assert [f.name for f in top] == [f"{safe_file_name(d)}.png" for d in sorted(flags, key=lambda d: -flags[d])[:2]]
    with pytest.raises(ReplayError, match="nope"):
        plot_devices(small_result, tmp_path / "x", devices=["nope"])

    page = plot_page(small_result, tmp_path / "page.png", max_devices=5)
    assert page.read_bytes()[:8] == PNG_MAGIC


def test_ids_and_names_with_dollar_signs_are_plotted_as_text(tmp_path, small_result):
    # matplotlib reads $...$ as maths: an id such as 'a$\\alpha_{$b' had ended the plots with a traceback.
    devices = list(small_result.device_rows)[:2]
    odd = ReplayResult(**{**small_result.__dict__, "device_rows": {
        "a$\\alpha_{$b": small_result.device_rows[devices[0]], "cost $5 and $x": small_result.device_rows[devices[1]]}})
    files = plot_devices(odd, tmp_path / "plots", devices=["a$\\alpha_{$b", "cost $5 and $x"])
    assert len(files) == 2 and all(f.read_bytes()[:8] == PNG_MAGIC for f in files)
    assert plot_page(odd, tmp_path / "page.png", devices=["a$\\alpha_{$b"]).read_bytes()[:8] == PNG_MAGIC


def test_safe_file_names():
    assert safe_file_name("realAWS/ec2 cpu:1") == "realAWS__ec2_cpu_1"
    assert safe_file_name("..") == "__" and safe_file_name("a.b-c_d") == "a.b-c_d"
    assert len(safe_file_name("x" * 1000)) <= 120


def test_plot_names_that_collide_get_a_number(tmp_path, small_result):
    devices = list(small_result.device_rows)[:2]
    renamed = ReplayResult(**{**small_result.__dict__, "device_rows": {
        "a/b": small_result.device_rows[devices[0]], "a__b": small_result.device_rows[devices[1]]}})
    assert [f.name for f in plot_devices(renamed, tmp_path, devices=["a/b", "a__b"])] == ["a__b.png", "a__b-2.png"]


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_refuses_a_bad_out_before_anything_else(tmp_path, capsys):
    missing = ["--data", str(tmp_path / "no-data"), "--model-path", str(tmp_path / "no-model.pt")]
    assert main(["replay", *missing, "--out", str(tmp_path / "no-dir" / "r.csv")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "no-dir" in err and "does not exist" in err and "no-data" not in err
    assert main(["replay", *missing, "--out", str(tmp_path / "r.txt")]) == 2
    assert ".csv or .parquet" in capsys.readouterr().err
    (tmp_path / "dir.csv").mkdir()
    assert main(["replay", *missing, "--out", str(tmp_path / "dir.csv")]) == 2
    assert "is a directory" in capsys.readouterr().err
    # then the model, still before the data
    assert main(["replay", *missing, "--out", str(tmp_path / "r.csv")]) == 2
    err = capsys.readouterr().err
    assert "no-model.pt" in err and "no-data" not in err
    assert not (tmp_path / "r.csv").exists()


def test_cli_refuses_a_value_count_not_the_models(tmp_path, capsys):
    data = write_long_csv(tmp_path / "two-values.csv", fleet(2), ["a", "b"])
    model = save_model(tmp_path / "one-value.pt", DAY_DEVICE_NORM)
    code = main(["replay", "--data", str(data), "--out", str(tmp_path / "r.csv"), "--model-path", str(model),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "two-values.csv" in err and "one-value.pt" in err and "2 value column(s)" in err


def test_cli_replays_writes_plots_and_prints_a_summary(tmp_path, capsys):
    data = write_long_csv(tmp_path / "fleet.csv", fleet(1), ["value"])
    model = save_model(tmp_path / "model.pt", DAY_DEVICE_NORM)
    out = tmp_path / "results.parquet"
    code = main(["replay", "--data", str(data), "--out", str(out), "--plots", str(tmp_path / "plots"),
                 "--max-plots", "3", "--plots-page", str(tmp_path / "page.png"), "--model-path", str(model),
                 "--model-device", "cpu", "--state-ttl-seconds", str(TTL), "--anomaly-threshold", "0.99",
                 "--anomaly-warmup", "10", "--batch-size", "64", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["readings"] == pq.read_metadata(out).num_rows and summary["devices"] == 6
    assert summary["out"] == str(out) and summary["plots"] == 3 and summary["plots_page"] == str(tmp_path / "page.png")
    assert len(list((tmp_path / "plots").glob("*.png"))) == 3 and (tmp_path / "page.png").stat().st_size > 0

    # the same settings through the library give the same table: one code path
    engine = Engine.build(load_model_file(model), capacity=100_000, device="cpu", ttl_seconds=TTL, anomaly=PARAMS)
    expected = replay(load_histories(data), engine, batch_size=64, progress=False)
    table = pq.read_table(out)
    assert summary["flagged"] == expected.flagged > 0
    for name, column in expected.columns.items():
        np.testing.assert_array_equal(np.asarray(table.column(name).to_pylist(), dtype=column.dtype), column)


def test_cli_replay_takes_the_columns_the_model_was_trained_on_by_name(tmp_path, capsys):
    # A model that names its columns (as `streamer train --data` records them) replayed on a file
    # with them in the other order: taken by position, b had been fed as a and a as b, exit 0.
    devices = fleet(2)
    model = tmp_path / "named.pt"
    save_model_file(model, init_random_model(PLAIN, 3), PLAIN, "named", meta={"value_columns": ["a", "b"]})
    straight = write_long_csv(tmp_path / "ab.csv", devices, ["a", "b"])
    swapped = write_long_csv(tmp_path / "ba.csv", {d: (ts, v[:, ::-1]) for d, (ts, v) in devices.items()}, ["b", "a"])
    common = ["--model-path", str(model), "--model-device", "cpu", "--no-progress", "--batch-size", "64"]
    tables = []
    for data in (straight, swapped):
        out = tmp_path / f"{data.stem}.parquet"
        assert main(["replay", "--data", str(data), "--out", str(out), *common]) == 0
        tables.append(pq.read_table(out).sort_by([("device_id", "ascending"), ("ts", "ascending")]))
    assert tables[0].column_names == tables[1].column_names and "forecast_a" in tables[0].column_names
    assert tables[0].equals(tables[1])
    # --value-columns still says which columns stand for the model's, in its order.
    renamed = write_long_csv(tmp_path / "pq.csv", devices, ["p", "q"])
    capsys.readouterr()
    assert main(["replay", "--data", str(renamed), "--out", str(tmp_path / "pq.parquet"), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing value column(s) ['a', 'b']" in err
    assert "was trained on value columns ['a', 'b']" in err and "--value-columns" in err
    out = tmp_path / "pq.parquet"
    assert main(["replay", "--data", str(renamed), "--out", str(out), "--value-columns", "p,q", *common]) == 0
    assert pq.read_table(out).column("forecast_p").to_pylist() == \
        pq.read_table(tmp_path / "ab.parquet").column("forecast_a").to_pylist()


def test_cli_replay_that_fails_leaves_no_plots_directory_and_refuses_options_it_would_ignore(tmp_path, capsys):
    data = write_long_csv(tmp_path / "fleet.csv", fleet(1), ["value"])
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    plots = tmp_path / "new" / "plots"
    assert main(["replay", "--data", str(data), "--out", str(tmp_path / "r.csv"), "--model-path", str(junk),
                 "--plots", str(plots), "--no-progress"]) == 2
    assert "junk.pt" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # it had been left behind, empty
    kept = tmp_path / "kept"
    (kept / "plots").mkdir(parents=True)
    assert main(["replay", "--data", str(data), "--out", str(tmp_path / "r.csv"), "--model-path", str(junk),
                 "--plots", str(kept / "plots" / "more"), "--no-progress"]) == 2
    assert (kept / "plots").is_dir() and not (kept / "plots" / "more").exists()  # what was there stays
    for extra, said in ((["--max-plots", "3"], "--max-plots applies to --plots only"),
                        (["--page-devices", "2"], "--page-devices applies to --plots-page only")):
        capsys.readouterr()
        assert main(["replay", "--data", str(data), "--out", str(tmp_path / "r.csv"), *extra]) == 2
        assert capsys.readouterr().err == f"streamer: error: {said}\n"
