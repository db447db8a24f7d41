"""The LSTM step over table rows (streamer.kernels) against the reference: StepWeights and the
offline nn.LSTM. The Triton kernel runs under Triton's interpreter on the CPU (so that CI
without a GPU covers it) and compiled on CUDA when there is one."""

from __future__ import annotations

import functools
import logging
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import streamer.kernels
from streamer.engine import Engine, ReadingBatch
from streamer.model import ModelConfig, StepWeights, init_random_model
from tests.conftest import CUDA, make_bundle

# The stated bound of bfloat16 state (streamer.kernels): forecasts within this of the float32
# reference, absolute, for unit-normal inputs to a random H=32 L=2 model, over STREAM_STEPS readings
# (measured: 4e-4 for the torch step, 8e-4 for the kernel; both round x, h and weights to bfloat16).
BF16_FORECAST_ATOL = 5e-3
STREAM_STEPS = 100
SHAPES = [(3, 16, 2, 3), (1, 12, 1, 1), (2, 8, 3, 2), (1, 64, 2, 1)]  # input, hidden, layers, output
# The interpreter computes in numpy, which warns where exp(-x) overflows to inf (sigmoid -> 0, as on a GPU).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@functools.cache
def interpreted_kernels():
    """A second copy of streamer.kernels whose Triton functions were decorated under Triton's
    interpreter (chosen at decoration time): the fused kernel on CPU tensors."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("streamer_kernels_interpreted", streamer.kernels.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


@pytest.fixture(scope="module")
def interpreted():
    if streamer.kernels.triton is None:
        pytest.skip("no Triton in this torch build")
    return interpreted_kernels()


def _model(shape: tuple[int, int, int, int], seed: int = 1):
    n_in, hidden, layers, n_out = shape
    return init_random_model(ModelConfig(n_in, hidden, layers, n_out), seed)


def _steps(interpreted, device: str) -> list[tuple[str, type]]:
    """The torch step, and the Triton one: interpreted on the CPU, compiled on CUDA."""
    kernels = interpreted if device == "cpu" else streamer.kernels
    return [("torch", kernels.TorchLstmStep), ("triton", kernels.TritonLstmStep)]


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if CUDA else [])


def _check_one_step(make_step, shape, device: str, model_seed: int = 1, seed: int = 0, msg: str = "") -> None:
    """One step of ``make_step(model)`` over 97 random rows of a table of 150 against StepWeights:
    forecasts, h and c within 1e-6, every other row and column untouched."""
    n_in, hidden, layers, n_out = shape
    model = _model(shape, model_seed)
    ref = StepWeights(model, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    capacity, b, lh = 150, 97, layers * hidden
    # The h/c block as the engine's table holds it: the leading columns of wider rows.
    table = torch.randn(capacity, 2 * lh + 5, generator=gen) * 0.5
    slots = torch.randperm(capacity, generator=gen)[:b]
    x = torch.randn(b, n_in, generator=gen)
    out_ref, h_ref, c_ref = ref.step(x, table[slots, :lh].view(b, layers, hidden), table[slots, lh : 2 * lh].view(b, layers, hidden))
    step = make_step(model)
    rows = table.clone().to(device)
    on = slots.to(device)
    out = step(x.to(device), on, rows.index_select(0, on), rows[:, : 2 * lh])
    got = rows.cpu()
    torch.testing.assert_close(out.cpu(), out_ref, atol=1e-6, rtol=0, msg=msg)
    torch.testing.assert_close(got[slots, :lh].view(b, layers, hidden), h_ref, atol=1e-6, rtol=0, msg=msg)
    torch.testing.assert_close(got[slots, lh : 2 * lh].view(b, layers, hidden), c_ref, atol=1e-6, rtol=0, msg=msg)
    others = torch.ones(capacity, dtype=torch.bool)
    others[slots] = False
    assert torch.equal(got[others], table[others]), msg
    assert torch.equal(got[slots, 2 * lh :], table[slots, 2 * lh :]), msg


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_one_step_matches_step_weights_and_leaves_other_rows(interpreted, shape, device):
    for name, cls in _steps(interpreted, device):
        _check_one_step(lambda model: cls(model, torch.device(device)), shape, device, msg=name)


# The kernel's launch shapes: each layer's h and c loaded ahead (preload), over 7 blocks of 16
# rows or one of 128 rows with 8 warps.
LAUNCH_SHAPES = [dict(preload=True), dict(preload=True, block_b=16, num_warps=1), dict(block_b=128, num_warps=8)]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("shape", [(2, 16, 3, 2), (1, 12, 1, 1), (1, 64, 2, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("launch", LAUNCH_SHAPES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_launch_shape_steps_as_the_reference(interpreted, shape, launch, device):
    kernels = interpreted if device == "cpu" else streamer.kernels
    _check_one_step(lambda model: kernels.TritonLstmStep(model, torch.device(device), **launch), shape, device,
                    model_seed=2, seed=3)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("launch", [{}, *LAUNCH_SHAPES, dict(maxnreg=168), dict(fast_math=False)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_a_large_batch_on_cuda_steps_as_the_torch_step_every_time(dtype, launch):
    """65,536 random rows of a table of twice that, many programs at once on every multiprocessor:
    on an H200 the head's tl.dot raced there in the default launch shape with bfloat16 state
    (forecasts of 1e37, different each run; the state right), which small batches never showed."""
    model = _model((1, 64, 2, 1), seed=0)
    device = torch.device("cuda")
    b, lh = 65536, 2 * 64
    gen = torch.Generator(device=device).manual_seed(0)
    slots = torch.randperm(2 * b, device=device, generator=gen)[:b]
    x = torch.randn(b, 1, device=device, generator=gen)
    start = (torch.randn(b, 2 * lh, device=device, generator=gen) * 0.5).to(dtype).float()
    table = torch.zeros(2 * b, 2 * lh + 5, device=device)
    table[slots, : 2 * lh] = start
    want = streamer.kernels.TorchLstmStep(model, device)(x, slots, table.index_select(0, slots), table[:, : 2 * lh])
    atol = 1e-5 if dtype == torch.float32 else BF16_FORECAST_ATOL
    outs = []
    for _ in range(2):
        lead = torch.zeros(2 * b, 2 * lh, device=device, dtype=dtype)
        lead[slots] = start.to(dtype)
        outs.append(streamer.kernels.TritonLstmStep(model, device, dtype, **launch)(x, slots, None, lead))
        torch.testing.assert_close(lead[slots].float(), table[slots, : 2 * lh], atol=atol * 2, rtol=0)
    for out in outs:
        torch.testing.assert_close(out, want, atol=atol, rtol=0)
    assert torch.equal(outs[0], outs[1])


def _stream(step, x_seq: torch.Tensor, layers: int, hidden: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Step (b, T, in) through ``step`` on a table of ``dtype``; forecasts (b, T, out)."""
    b, horizon = x_seq.shape[:2]
    lead = torch.zeros(b + 3, 2 * layers * hidden, dtype=dtype, device=device)
    slots = torch.arange(3, b + 3, device=device)
    outs = []
    for t in range(horizon):
        rows = lead.index_select(0, slots).float() if not step.reads_lead else None
        outs.append(step(x_seq[:, t].contiguous().to(device), slots, rows, lead).cpu())
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("device", _devices())
def test_streamed_steps_equal_the_offline_lstm_and_bfloat16_stays_within_its_bound(interpreted, device):
    shape = (2, 32, 2, 2)
    model = _model(shape, seed=4)
    gen = torch.Generator().manual_seed(1)
    x_seq = torch.randn(16, STREAM_STEPS, 2, generator=gen)
    with torch.no_grad():
        seq, _ = model.lstm(x_seq)
        offline = model.fc(seq)  # (b, T, out): the forecast after every prefix
    for name, cls in _steps(interpreted, device):
        fp32 = _stream(cls(model, torch.device(device)), x_seq, 2, 32, torch.float32, device)
        torch.testing.assert_close(fp32, offline, atol=1e-5, rtol=0, msg=name)
        bf16 = _stream(cls(model, torch.device(device), torch.bfloat16), x_seq, 2, 32, torch.bfloat16, device)
        err = (bf16 - offline).abs().max().item()
        assert err <= BF16_FORECAST_ATOL, (name, err)
        assert err > 1e-5, (name, "bfloat16 state should not be bitwise float32")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_fast_math_kernel_on_cuda_stays_within_the_bfloat16_bound():
    # tanh.approx.f32 for the gates (inline PTX: compiled for CUDA only), same bound as bfloat16 state.
    model = _model((2, 32, 2, 2), seed=4)
    x_seq = torch.randn(16, STREAM_STEPS, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        offline = model.fc(model.lstm(x_seq)[0])
    cuda = torch.device("cuda")
    fast = streamer.kernels.TritonLstmStep(model, cuda, torch.bfloat16, fast_math=True)
    exact = streamer.kernels.TritonLstmStep(model, cuda, torch.bfloat16, fast_math=False)
    assert streamer.kernels.TritonLstmStep(model, cuda, torch.bfloat16).fast_math  # the default there
    got = _stream(fast, x_seq, 2, 32, torch.bfloat16, "cuda")
    err = (got - offline).abs().max().item()
    assert err <= BF16_FORECAST_ATOL, err
    assert not torch.equal(got, _stream(exact, x_seq, 2, 32, torch.bfloat16, "cuda")), "fast math had no effect"


def test_fast_math_is_refused_off_cuda_and_for_float32_state():
    if streamer.kernels.triton is None:
        pytest.skip("no Triton in this torch build")
    model = _model((1, 8, 1, 1))
    for device, dtype in (("cpu", torch.bfloat16), ("cuda", torch.float32)):
        with pytest.raises(ValueError, match="fast_math is for bfloat16 state on CUDA"):
            streamer.kernels.TritonLstmStep(model, torch.device(device), dtype, fast_math=True)
    # By default it is on only where it may be: the CPU (Triton's interpreter) keeps exp and division.
    assert not streamer.kernels.TritonLstmStep(model, torch.device("cpu"), torch.bfloat16).fast_math


def test_cpu_step_of_a_device_does_not_depend_on_its_batch():
    """MKL sums small batches differently; the step pads them, so a device's result is bitwise the
    same alone or among others (replay and live then agree exactly)."""
    model = _model((1, 64, 2, 1))
    step = streamer.kernels.TorchLstmStep(model, torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(300, 256, generator=gen) * 0.5
    x = torch.randn(300, 1, generator=gen)
    results = {}
    for b in (1, 3, 7, 8, 300):
        lead = table.clone()
        slots = torch.arange(b)
        out = step(x[:b], slots, lead.index_select(0, slots), lead)
        results[b] = (out[0].clone(), lead[0].clone())
    for b, (out, row) in results.items():
        assert torch.equal(out, results[300][0]) and torch.equal(row, results[300][1]), b


def test_engine_with_bfloat16_state_halves_the_h_c_bytes_and_forecasts_within_the_bound():
    bundle = make_bundle(input_size=2, hidden_size=32, num_layers=2, seed=6)
    engines = {dtype: Engine.build(bundle, capacity=64, device="cpu", state_dtype=dtype)
               for dtype in (torch.float32, torch.bfloat16)}
    assert engines[torch.bfloat16].table.lead.dtype == torch.bfloat16
    lead_bytes = {d: e.table.lead.element_size() for d, e in engines.items()}
    assert lead_bytes == {torch.float32: 4, torch.bfloat16: 2}
    rng = np.random.default_rng(3)
    ids = [f"d{i}" for i in range(20)]
    worst = 0.0
    for t in range(100):
        values = rng.normal(size=(20, 2)).astype(np.float32)
        preds = {d: e.step(ReadingBatch(ids, np.full(20, float(t)), values), now=float(t))[0]
                 for d, e in engines.items()}
        worst = max(worst, float(np.abs(preds[torch.bfloat16].forecast - preds[torch.float32].forecast).max()))
    assert 0 < worst <= BF16_FORECAST_ATOL
    # Checkpoints export float32 rows whatever the state dtype; restoring them is exact.
    table = engines[torch.bfloat16].table
    ids_out, rows, seen = table.export(np.arange(5))
    assert rows.dtype == np.float32 and rows.shape == (5, table.width)
    table.restore(ids_out, rows, seen, partition=0)
    assert np.array_equal(table.export(np.array([table.slot_of(i) for i in ids_out]))[1], rows)


def test_unknown_state_dtype_is_refused():
    with pytest.raises(ValueError, match="float16"):
        streamer.kernels.make_lstm_step(_model((1, 8, 1, 1)), torch.device("cpu"), torch.float16)


def test_a_fused_step_the_gpu_cannot_launch_gives_way_to_the_torch_step(interpreted, monkeypatch, caplog):
    # Triton refuses the kernel's first launch where a gate's weight blocks do not fit the GPU's
    # shared memory (an H200 at bfloat16 hidden size 256: 294,912 bytes against 232,448); that
    # refusal is made here by the launch itself, the rest is the real kernel under the interpreter.
    model = _model((1, 8, 2, 1))
    cpu = torch.device("cpu")
    fused = interpreted.TritonLstmStep(model, cpu)
    assert interpreted.fused_if_it_launches(fused, lambda: pytest.fail("fell back from a step that fits")) is fused

    class Refused:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise interpreted.OutOfResources(294912, 232448, "shared memory")
            return launch

    monkeypatch.setattr(interpreted, "_lstm_rows_kernel", Refused())
    caplog.set_level(logging.WARNING)
    step = interpreted.fused_if_it_launches(interpreted.TritonLstmStep(model, cpu),
                                            lambda: streamer.kernels.TorchLstmStep(model, cpu))
    assert isinstance(step, streamer.kernels.TorchLstmStep)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "does not fit this GPU for hidden size 8, input size 1" in said[0]
    assert "Required: 294912" in said[0]

    # Triton's own launcher build, which needs a C compiler and a writable cache directory.
    class NoCompiler:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable")
            return launch

    monkeypatch.setattr(interpreted, "_lstm_rows_kernel", NoCompiler())
    caplog.clear()
    step = interpreted.fused_if_it_launches(interpreted.TritonLstmStep(model, cpu),
                                            lambda: streamer.kernels.TorchLstmStep(model, cpu))
    assert isinstance(step, streamer.kernels.TorchLstmStep)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "could not be launched (RuntimeError: Failed to find C compiler" in said[0]


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning")
def test_kernel_resources_compiles_the_kernel_for_a_gpu_target_without_a_gpu():
    """bench/kernel_resources.py, the tool behind the README's size limit: an sm_90 compile on
    this machine, the shape the benchmarks use fitting an H200's shared memory."""
    if streamer.kernels.triton is None:
        pytest.skip("no Triton in this torch build")
    tool_path = Path(__file__).resolve().parents[1] / "bench" / "kernel_resources.py"
    spec = importlib.util.spec_from_file_location("kernel_resources", tool_path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    needed = tool.shared_bytes("bfloat16", 64, 1, 2, 1, arch=90)
    assert 0 < needed <= 232448
