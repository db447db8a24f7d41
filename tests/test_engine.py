"""The engine against the offline model: streamed one reading at a time == run over the whole sequence."""

import numpy as np
import pytest
import torch

import streamer.engine
import streamer.kernels
from streamer.anomaly import AnomalyParams
from streamer.engine import GRAPH_MAX_ROWS, Engine, ReadingBatch, plan_lists, plan_waves
from streamer.errors import CapacityError, StreamerError
from streamer.features import denormalize, normalize_sequences_with_stats, time_features
from streamer.model import Normalization
from tests.conftest import CUDA, DEVICES, make_bundle
from tests.test_kernels import interpreted_kernels


def offline_forecasts(bundle, seq: np.ndarray, ts: np.ndarray | None = None) -> np.ndarray:
    """LSTMModel.forward over every prefix of one device's sequence (T, F) -> (T, F), with the
    model file's inputs built offline: whole-sequence normalisation and time features."""
    x = torch.from_numpy(seq).float()
    norm, config = bundle.normalization, bundle.config
    if norm is not None:
        x = (x - norm.mean) / norm.std
    if config.device_norm_alpha is not None:
        z, mean, var = (torch.from_numpy(a) for a in normalize_sequences_with_stats([seq], config.device_norm_alpha)[0])
        x = z
    if config.time_features:
        x = torch.cat([x, torch.from_numpy(time_features(ts, config.time_features))], dim=1)
    with torch.no_grad():
        outs = [bundle.model(x[None, : t + 1])[0][0] for t in range(len(seq))]
    out = torch.stack(outs)
    if norm is not None:
        out = out * norm.std + norm.mean
    if config.device_norm_alpha is not None:
        out = denormalize(out, mean, var)
    return out.numpy()


def test_plan_waves_keeps_per_device_order():
    plan = plan_waves(["a", "b", "a", "c", "a", "b"])
    assert plan.unique == ["a", "b", "c"]
    assert [list(r) for r, _ in plan.waves] == [[0, 1, 3], [2, 5], [4]]
    assert [list(u) for _, u in plan.waves] == [[0, 1, 2], [0, 1], [0]]
    assert plan_waves([]).waves == []


def test_plan_lists_is_plan_waves_of_the_lists_one_after_another(monkeypatch):
    monkeypatch.setattr(streamer.engine, "LIST_PLAN_MIN_IDS", 1)  # short lists, planned per list all the same
    rng = np.random.default_rng(5)
    planned_per_list = shared = 0
    for trial in range(200):
        # Senders' lists of their own devices (some sharing a device, some with one twice, some
        # equal to another's but a new tuple), sent again at random: the plan of the readings they
        # make is plan_waves's, or None where it cannot be made per list.
        pool = [f"d{i}" for i in range(int(rng.integers(1, 40)))]
        senders = [tuple(str(d) for d in rng.choice(pool, size=int(rng.integers(1, min(8, len(pool)) + 1)),
                                                    replace=bool(rng.random() < 0.1)))
                   for _ in range(int(rng.integers(1, 5)))]
        if rng.random() < 0.3:
            senders.append(tuple(list(senders[0])))  # equal, not the same object
        if rng.random() < 0.3:
            senders.append(())  # a batch message of no rows: every empty tuple is the one ()
        sent = tuple(senders[int(i)] for i in rng.integers(0, len(senders), size=int(rng.integers(1, 12))))
        ids = [device for listed in sent for device in listed]
        expected = plan_waves(ids)
        planned = plan_lists(sent, ids)
        distinct = list({id(listed): listed for listed in sent}.values())
        flat = [device for listed in distinct for device in listed]
        if len(flat) == len(ids) or len(ids) < len(sent):  # no repeat; or, of empty lists, less than an id a list
            assert planned is None, trial
            continue
        assert planned is not None, trial
        plan, (hashes, objects) = planned
        assert plan.unique == expected.unique and plan.first.tolist() == expected.first.tolist()
        assert [(r.tolist(), u.tolist()) for r, u in plan.waves] == [(r.tolist(), u.tolist()) for r, u in expected.waves]
        assert objects.tolist() == plan.unique and hashes.tolist() == [hash(d) for d in plan.unique]
        planned_per_list += len(set(flat)) == len(flat)
        shared += len(set(flat)) < len(flat)
    assert planned_per_list > 30 and shared > 50  # both ways taken
    a, b = ("a", "b"), ("c",)
    plan, _ = plan_lists((a, b, a, a), ["a", "b", "c", "a", "b", "a", "b"])
    assert plan.unique == ["a", "b", "c"] and plan.first.tolist() == [0, 1, 2]
    assert [(r.tolist(), u.tolist()) for r, u in plan.waves] == [([0, 1, 2], [0, 1, 2]), ([3, 4], [0, 1]), ([5, 6], [0, 1])]
    plan, _ = plan_lists(((), a, b, (), a), ["a", "b", "c", "a", "b"])
    assert [(r.tolist(), u.tolist()) for r, u in plan.waves] == [([0, 1, 2], [0, 1, 2]), ([3, 4], [0, 1])]
    with pytest.raises(StreamerError, match="id lists hold 7 ids, its readings are 6"):
        plan_lists((a, b, a, a), ["a", "b", "c", "a", "b", "a"])
    monkeypatch.undo()  # lists of fewer ids than LIST_PLAN_MIN_IDS on average: plan_waves's
    assert plan_lists((a, b, a, a), ["a", "b", "c", "a", "b", "a", "b"]) is None
    long = tuple(f"d{i}" for i in range(streamer.engine.LIST_PLAN_MIN_IDS))
    assert plan_lists((long, long), list(long) * 2) is not None


# Batch sizes whose rows fall in every remainder of the vector loops and GEMM blocks, and below
# and above their first whole block: a device stepped alone, or in the tail rows of a chunk (past
# a multiple of 4, 16 or 32), had been summed or rounded by other code than in the whole blocks
# (MKL's GEMM, the vector loops' tails), eager and compiled.
TAIL_BATCH_SIZES = [*range(2, 71), 100, 127, 1000, 4095, 4097, 4400]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("model, state_dtype, threads", [
    ("h64", torch.float32, 2), ("h64", torch.bfloat16, 2), ("h64", torch.float32, 1),
    ("f3_day_norm", torch.float32, 2), ("f3_day_norm", torch.bfloat16, 2),
])
def test_a_device_anywhere_in_any_batch_steps_bitwise_as_alone(model, state_dtype, threads, compiled):
    bundle = (make_bundle(input_size=1, hidden_size=64, num_layers=2, seed=3) if model == "h64" else
              make_bundle(input_size=3, hidden_size=13, num_layers=2, seed=4, time_features=("day",),
                          device_norm_alpha=0.05))
    f = bundle.config.values_size
    rng = np.random.default_rng(5)
    mine = {name: rng.normal(size=(4, f)).astype(np.float32) * 3 for name in ("first", "middle", "last")}
    crowd = rng.normal(size=(max(TAIL_BATCH_SIZES), f)).astype(np.float32)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def results(b: int, tracked: dict[str, int]) -> dict[str, list[tuple]]:
            """The tracked devices' results over 4 steps, each in row ``tracked[name]`` of b rows."""
            engine = Engine.build(bundle, capacity=4500, device="cpu", state_dtype=state_dtype, compile=compiled)
            got: dict[str, list[tuple]] = {name: [] for name in tracked}
            for t in range(4):
                ids = [f"o{i}" for i in range(b)]
                values = crowd[:b] * (t + 1)
                for name, row in tracked.items():
                    ids[row] = name
                    values[row] = mine[name][t]
                preds, _ = engine.step(ReadingBatch(ids, np.full(b, 3600.0 * t), values), now=float(t))
                for name, row in tracked.items():
                    got[name].append((preds.forecast[row].tobytes(), preds.residual[row], preds.surprise[row],
                                      preds.is_anomaly[row]))
            return got

        alone = {name: results(1, {name: 0})[name] for name in mine}
        differ = []
        for b in TAIL_BATCH_SIZES:
            tracked = {"first": 0, "middle": b // 2, "last": b - 1} if b >= 3 else {"first": 0, "last": 1}
            got = results(b, tracked)
            differ += [(b, name, row) for name, row in tracked.items() if got[name] != alone[name]]
    finally:
        torch.set_num_threads(previous)
    assert not differ, f"(batch size, device, row) whose results differ from stepping it alone: {differ[:40]}"


def test_a_batch_of_id_lists_steps_as_the_same_readings_without_them(monkeypatch):
    monkeypatch.setattr(streamer.engine, "LIST_PLAN_MIN_IDS", 1)
    bundle = make_bundle(input_size=2, seed=4)
    gateways = [tuple(f"gw{g}-{i}" for i in range(7)) for g in range(3)]
    shared = ("gw0-3", "gw3-0", "gw3-0")  # a device of another list, and one twice
    rng = np.random.default_rng(2)
    engines = [Engine.build(bundle, capacity=32, device="cpu") for _ in range(2)]
    for batch in range(6):
        sent = tuple(gateways[int(i)] for i in rng.integers(0, 3, size=6)) + ((shared,) if batch % 2 else ()) + ((),) * 9
        ids = [device for listed in sent for device in listed]
        values = rng.normal(size=(len(ids), 2)).astype(np.float32)
        ts = np.full(len(ids), 1.7e9 + batch)
        with_lists, report = engines[0].step(ReadingBatch(ids, ts, values, None, sent), now=float(batch))
        without, report_without = engines[1].step(ReadingBatch(ids, ts, values), now=float(batch))
        assert report.waves == report_without.waves > 1 and report.new_devices == report_without.new_devices
        assert with_lists.forecast.tobytes() == without.forecast.tobytes()
        assert with_lists.anomaly_score.tobytes() == without.anomaly_score.tobytes()
    tables = [engine.table for engine in engines]
    assert [tables[0].slot_of(d) for d in ids] == [tables[1].slot_of(d) for d in ids]
    assert all(torch.equal(a, b) for a, b in zip(tables[0].blocks(), tables[1].blocks()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inputs", ["raw", "global", "device+time"])
@pytest.mark.parametrize("rows_per_step", [None, 5])
@pytest.mark.parametrize("step", ["default", "triton", "compiled"])
@pytest.mark.parametrize("waves", ["as_they_come", "padded"])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
def test_streaming_equals_offline_model(device: str, inputs: str, rows_per_step: int | None, step: str, waves: str):
    rng = np.random.default_rng(7)
    n_features, n_devices = 3, 12
    norm = Normalization(torch.tensor([10.0, -1.0, 0.5]), torch.tensor([2.0, 0.5, 4.0])) if inputs == "global" else None
    extra = {"time_features": ("day", "week"), "device_norm_alpha": 0.05} if inputs == "device+time" else {}
    bundle = make_bundle(input_size=n_features, hidden_size=16, num_layers=2, seed=11, normalization=norm, **extra)
    # Padded waves: CUDA's default, replayed from CUDA graphs there; run as they are on the CPU.
    if step == "compiled" and device != "cpu":
        pytest.skip("model.compile is for the CPU")
    engine = Engine.build(bundle, capacity=64, device=device, cuda_graphs=waves == "padded", compile=step == "compiled")
    engine.max_rows_per_step = rows_per_step  # 5: waves cut into many small steps
    if step == "triton":  # the fused kernel, CUDA's default, here under Triton's interpreter
        if device == "cuda" or streamer.kernels.triton is None:
            pytest.skip("the default step on CUDA" if device == "cuda" else "no Triton in this torch build")
        engine.lstm = interpreted_kernels().TritonLstmStep(bundle.model, engine.device)
    assert engine.lstm.fused == (step == "triton" or device == "cuda")
    assert (engine._compiled is not None) == (step == "compiled")
    assert engine.cuda_graphs == (device == "cuda" and waves == "padded")
    engine.pad_waves = waves == "padded"

    # Devices with different lengths, joining at different points; readings interleaved at random,
    # cut into micro-batches of random size so a device often has several readings in one batch.
    lengths = rng.integers(5, 40, size=n_devices)
    sequences = {
        f"dev-{d}": (rng.normal(size=(lengths[d], n_features)) * 3 + 10**d).astype(np.float32) for d in range(n_devices)
    }
    join_at = {f"dev-{d}": int(rng.integers(0, 60)) for d in range(n_devices)}
    stamps = {dev: 1.7e9 + np.cumsum(rng.uniform(1, 20_000, size=len(seq))) for dev, seq in sequences.items()}
    stream = []
    for dev, seq in sequences.items():
        stream += [(join_at[dev] + t + rng.random(), dev, t) for t in range(len(seq))]
    stream.sort()  # per device, t increases with the sort key
    streamed: dict[str, list[np.ndarray]] = {dev: [] for dev in sequences}
    multi_reading_batches = 0
    i = 0
    while i < len(stream):
        size = int(rng.integers(1, 50))
        chunk = stream[i : i + size]
        i += size
        ids = [dev for _, dev, _ in chunk]
        multi_reading_batches += len(set(ids)) < len(ids)
        values = np.stack([sequences[dev][t] for _, dev, t in chunk])
        ts = np.array([stamps[dev][t] for _, dev, t in chunk])
        preds, report = engine.step(ReadingBatch(ids, ts, values), now=float(i))
        assert report.readings == len(chunk)
        for dev, forecast in zip(preds.device_ids, preds.forecast):
            streamed[dev].append(forecast)
    assert multi_reading_batches > 5
    for dev, seq in sequences.items():
        expected = offline_forecasts(bundle, seq, stamps[dev])
        # Devices' levels reach 1e11: compare relative to each device's scale.
        scale = 1.0 if inputs == "raw" else float(np.abs(seq).max())
        np.testing.assert_allclose(np.stack(streamed[dev]) / scale, expected / scale, atol=1e-5, rtol=0)


def test_evicted_device_restarts_from_zeros():
    bundle = make_bundle(input_size=2, seed=3)
    engine = Engine.build(bundle, capacity=2, device="cpu")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 2)).astype(np.float32)
    for t in range(3):
        engine.step(ReadingBatch(["a"], np.zeros(1), a[t : t + 1]), now=float(t))
    engine.step(ReadingBatch(["b", "c"], np.zeros(2), rng.normal(size=(2, 2)).astype(np.float32)), now=10.0)
    assert "a" not in engine.table
    preds, report = engine.step(ReadingBatch(["a"] * 3, np.zeros(3), a[3:]), now=11.0)
    assert report.new_devices == 1 and report.evicted_capacity == 1 and report.waves == 3
    np.testing.assert_allclose(preds.forecast, offline_forecasts(bundle, a[3:]), atol=1e-5, rtol=0)


def test_anomaly_flags_a_spike_after_warmup_only():
    bundle = make_bundle(input_size=1, hidden_size=8, num_layers=1, seed=5, device_norm_alpha=0.01)
    engine = Engine.build(bundle, capacity=4, device="cpu", anomaly=AnomalyParams(warmup=20))
    rng = np.random.default_rng(1)
    signal = (np.sin(np.arange(400) / 8.0) + rng.normal(scale=0.05, size=400)).astype(np.float32)
    signal[5] += 40.0  # inside the warm-up: never flagged
    signal[300] += 40.0
    flagged, scores = [], []
    for t, value in enumerate(signal):
        preds, _ = engine.step(ReadingBatch(["s"], np.array([float(t)]), np.array([[value]])), now=float(t))
        flagged.append(bool(preds.is_anomaly[0]))
        scores.append(float(preds.anomaly_score[0]))
        assert 0.0 <= scores[-1] <= 1.0
    assert flagged[300] and not flagged[5]
    assert scores[:21] == [0.0] * 21
    assert sum(flagged) <= 3, [t for t, f in enumerate(flagged) if f]


def test_absurd_but_finite_readings_keep_scores_finite():
    bundle = make_bundle(input_size=2, hidden_size=8, num_layers=1, seed=2)
    engine = Engine.build(bundle, capacity=4, device="cpu")
    sequence = [[1.0, 2.0], [1e20, 2.0], [1.0, 2.0], [1.0, 2.0], [3e38, -3e38], [1.0, 2.0], [1.0, 2.0]]
    for t, values in enumerate(sequence):
        preds, _ = engine.step(ReadingBatch(["d"], np.zeros(1), np.array([values], np.float32)), now=float(t))
        assert np.isfinite(preds.forecast).all() and np.isfinite(preds.anomaly_score).all(), t


def test_swap_to_a_new_shape_resets_the_table_same_shape_keeps_rows():
    engine = Engine.build(make_bundle(input_size=2, hidden_size=8, seed=1), capacity=8, device="cpu")
    values = np.ones((3, 2), np.float32)
    engine.step(ReadingBatch(["a", "b", "c"], np.zeros(3), values), now=1.0)
    rows = engine.table.rows.clone()
    assert engine.swap_model(make_bundle(input_size=2, hidden_size=8, seed=2, version="v2")) is False
    assert len(engine.table) == 3 and torch.equal(engine.table.rows, rows)

    bigger = make_bundle(input_size=2, hidden_size=12, num_layers=1, seed=3, version="v3", time_features=("day",))
    assert engine.swap_model(bigger) is True
    assert len(engine.table) == 0 and engine.table.capacity == 8 and engine.model_version == "v3"
    preds, report = engine.step(ReadingBatch(["a"], np.zeros(1), values[:1]), now=2.0)
    assert report.new_devices == 1
    np.testing.assert_allclose(preds.forecast, offline_forecasts(bigger, values[:1], np.zeros(1)), atol=1e-5)


def test_a_swap_to_another_global_normalisation_resets_the_table():
    # Rows hold forecasts, ranges and residual statistics in the model's normalised units: a
    # retrained model of the same shape but another mean and std had taken them over, and flagged
    # readings that were not anomalies (11 in 200 of a smooth sine, against none from zeros).
    first = Normalization(torch.tensor([100.0, 0.0]), torch.tensor([10.0, 1.0]))
    engine = Engine.build(make_bundle(input_size=2, hidden_size=8, seed=1, normalization=first), capacity=8,
                          device="cpu")
    engine.step(ReadingBatch(["a", "b"], np.zeros(2), np.ones((2, 2), np.float32)), now=1.0)
    rows = engine.table.rows.clone()
    same = Normalization(first.mean.clone(), first.std.clone())
    assert engine.swap_model(make_bundle(input_size=2, hidden_size=8, seed=2, normalization=same, version="v2")) is False
    assert len(engine.table) == 2 and torch.equal(engine.table.rows, rows)
    other = Normalization(torch.tensor([105.0, 0.0]), torch.tensor([2.0, 1.0]))
    assert engine.swap_model(make_bundle(input_size=2, hidden_size=8, seed=2, normalization=other, version="v3")) is True
    assert len(engine.table) == 0
    assert engine.swap_model(make_bundle(input_size=2, hidden_size=8, seed=2, version="v4")) is True  # none at all


def test_a_swap_whose_new_table_does_not_fit_is_one_line_and_keeps_the_old_model(monkeypatch):
    engine = Engine.build(make_bundle(input_size=2, hidden_size=8, seed=1), capacity=8, device="cpu")
    engine.step(ReadingBatch(["a"], np.zeros(1), np.ones((1, 2), np.float32)), now=1.0)
    table = engine.table

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1099511627776 bytes.")

    monkeypatch.setattr(streamer.engine, "DeviceStateTable", no_memory)
    with pytest.raises(CapacityError, match="state table capacity 8: .* could not be allocated"):
        engine.swap_model(make_bundle(input_size=2, hidden_size=12, seed=3, version="v3"))
    assert engine.table is table and engine.model_version == "test-1" and table.slot_of("a") is not None


@pytest.mark.parametrize("device", DEVICES)
def test_padded_waves_change_no_device_and_no_result(device: str):
    # The padding of a wave to its bucket points at the table's sink row: every prediction and
    # every device's row come out as without padding (through CUDA graphs on CUDA), with
    # evictions, new devices and several readings per device in a batch. To the last bit but
    # for the CPU's GEMM, whose sums differ in the last bit with the row count (1 ulp seen).
    bundle = make_bundle(input_size=2, hidden_size=16, num_layers=2, seed=3)
    plain = Engine.build(bundle, capacity=300, device=device, cuda_graphs=False)
    padded = Engine.build(bundle, capacity=300, device=device)
    padded.pad_waves = True
    assert padded.cuda_graphs == (device == "cuda")
    rng = np.random.default_rng(5)
    evicted, buckets = 0, set()
    for k in range(30):
        if k == 15:  # a new model of the same shape: the rows carry over, the graphs are captured anew
            for engine in (plain, padded):
                engine.swap_model(make_bundle(input_size=2, hidden_size=16, num_layers=2, seed=4, version="v2"))
            assert not padded._padded
            padded.pad_waves = True  # on the CPU: as the test asks (cuda_graphs decides on CUDA)
        n = int(rng.choice([1, 3, 17, 64, 65, 130, 300]))
        ids = [f"dev-{i}" for i in rng.integers(20 * k, 20 * k + 280, size=n)]  # the fleet moves on: evictions
        ts = np.full(n, 1.7e9 + k)
        values = (rng.normal(size=(n, 2)) * 3).astype(np.float32)
        values[rng.random(n) < 0.05] *= 50.0  # now and then a spike: anomaly statistics move too
        want, want_report = plain.step(ReadingBatch(ids, ts, values), now=float(k))
        got, got_report = padded.step(ReadingBatch(ids, ts, values), now=float(k))
        assert got_report.evicted_capacity == want_report.evicted_capacity
        evicted += got_report.evicted_capacity
        np.testing.assert_array_equal(got.is_anomaly, want.is_anomaly, err_msg=f"batch {k}")
        for name in ("forecast", "anomaly_score", "residual"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-7,
                                       err_msg=f"{name}, batch {k}")
        torch.testing.assert_close(padded.table.rows, plain.table.rows, rtol=1e-6, atol=1e-7,
                                   msg=f"table rows differ after batch {k}")
        buckets |= {key[0] for key in padded._padded}
    assert evicted > 0 and buckets >= {64, 256}


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [GRAPH_MAX_ROWS // 2 + 1, GRAPH_MAX_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_largest_graph_buckets_on_cuda_give_the_results_of_plain_launches(rows: int, dtype: torch.dtype):
    # The largest buckets, under both state dtypes, over a table that reuses GPU memory freed by
    # an earlier engine (uninitialised memory must never be read): finite, and as plain launches.
    bundle = make_bundle(input_size=1, hidden_size=64, num_layers=2, seed=7)
    Engine.build(bundle, capacity=4 * rows, device="cuda").table.rows.fill_(float("nan"))  # freed: garbage for the next
    engines = [Engine.build(bundle, capacity=2 * rows, device="cuda", state_dtype=dtype, cuda_graphs=graphs)
               for graphs in (False, True)]
    rng = np.random.default_rng(1)
    for k in range(3):
        ids = [f"d{i}" for i in rng.permutation(2 * rows)[:rows]]
        batch = ReadingBatch(ids, np.full(rows, 1.7e9 + k), rng.normal(size=(rows, 1)).astype(np.float32))
        plain, graphed = (engine.step(batch, now=float(k))[0] for engine in engines)
        for name in ("forecast", "anomaly_score", "residual"):
            want, got = getattr(plain, name), getattr(graphed, name)
            assert np.isfinite(want).all() and np.isfinite(got).all(), (name, k)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"{name}, batch {k}")
    assert engines[1]._padded and not engines[0]._padded


def test_a_step_that_cannot_be_captured_is_served_as_it_is_and_said_once(monkeypatch, caplog):
    # As on CUDA when capture fails (a driver or op that will not be captured): the wave runs
    # without padding, and so does every later one.
    bundle = make_bundle(input_size=1, hidden_size=8, num_layers=1, seed=2)
    engine = Engine.build(bundle, capacity=8, device="cpu")
    plain = Engine.build(bundle, capacity=8, device="cpu", cuda_graphs=False)
    engine.cuda_graphs = engine.pad_waves = True

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", refuse)
    batch = ReadingBatch(["a", "b"], np.zeros(2), np.ones((2, 1), np.float32))
    for now in (0.0, 1.0):
        got, _ = engine.step(batch, now=now)
        want, _ = plain.step(batch, now=now)
        np.testing.assert_array_equal(got.forecast, want.forecast)
    assert not engine.pad_waves and not engine.cuda_graphs and not engine._padded
    assert [r.message for r in caplog.records if "capture" in r.message] == [
        "CUDA graph capture of a 64-row step failed (operation not permitted when stream is capturing); steps"
        " launch their kernels one by one from now on"
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_device_whose_output_is_not_finite_starts_afresh_at_its_next_reading(device: str, compiled: bool):
    # A reading that makes the step's output overflow float32 (here 1e30, squared in the device's
    # running normalisation): that device's row is zeroed at once, so its next reading, in the same
    # batch (the next wave) or a later one, is stepped as a new device's first; others are untouched.
    # Compiled, the step finds those readings in its own graph.
    if compiled and device != "cpu":
        pytest.skip("model.compile is for the CPU")
    bundle = make_bundle(input_size=2, hidden_size=8, num_layers=2, seed=11, device_norm_alpha=0.01)
    engine = Engine.build(bundle, capacity=16, device=device, compile=compiled)
    others = Engine.build(bundle, capacity=16, device=device)
    fresh = Engine.build(bundle, capacity=16, device=device)
    rng = np.random.default_rng(0)
    normal = lambda: rng.normal(size=(1, 2)).astype(np.float32)  # noqa: E731
    first = np.concatenate([normal(), normal()])
    engine.step(ReadingBatch(["a", "b"], np.zeros(2), first), now=0.0)
    others.step(ReadingBatch(["b"], np.zeros(1), first[1:]), now=0.0)
    after, b_next = normal(), normal()
    blow_up = np.array([[1e30, 1.0]], np.float32)
    preds, report = engine.step(ReadingBatch(["a", "b", "a"], np.ones(3), np.concatenate([blow_up, b_next, after])),
                                now=1.0)
    assert report.reset_not_finite == 1 and report.waves == 2
    assert not np.isfinite(preds.forecast[0]).all()
    want_fresh = fresh.step(ReadingBatch(["a"], np.ones(1), after), now=1.0)[0]
    np.testing.assert_allclose(preds.forecast[2], want_fresh.forecast[0], rtol=0, atol=1e-6)  # a, afresh
    assert preds.residual[2] == 0.0 and preds.anomaly_score[2] == 0.0  # a first reading: no forecast before it
    want_b = others.step(ReadingBatch(["b"], np.ones(1), b_next), now=1.0)[0]
    np.testing.assert_allclose(preds.forecast[1], want_b.forecast[0], rtol=0, atol=1e-6)
    assert engine.step(ReadingBatch(["a"], np.full(1, 2.0), normal()), now=2.0)[1].reset_not_finite == 0
