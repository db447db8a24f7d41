"""The LSTM step over a state table's rows: h and c of every layer read at the batch's slots,
both layers' projections and gates, h and c written back to the same slots, the head's output.

Two implementations of one contract (``LstmStep.__call__``):

- ``TorchLstmStep`` (any torch device; the CPU path): the maths on the rows the engine
  gathered (under bfloat16, on h and c gathered from the table as they are), h and c written
  back with one index_copy_. Gates are one addmm per layer into a reused
  buffer and one in-place sigmoid over all four gates: the cell gate's weights are stored
  doubled, so that tanh(g) = 2 sigmoid(2g) - 1 (torch's CPU tanh is several times slower than
  its sigmoid); the absolute error of that identity is below 2e-7 in float32 (a few ulp near ±1).
- ``TritonLstmStep`` (CUDA, or Triton's interpreter on the CPU when this module is imported
  with TRITON_INTERPRET=1): one fused kernel per step. Each program takes BLOCK_B devices, loads h
  and c of each layer straight from the table at their slots, runs the projections with
  tl.dot, the gate maths in float32, stores h and c in place and writes the head's output.
  Nothing of the h/c block is copied through a gathered tensor.

State dtype: float32, or bfloat16 for h and c (half the bytes per device). Gate maths and c's
update run in float32 either way; under bfloat16 both steps also feed the projections bfloat16
operands (x, h and weights rounded to bfloat16, float32 accumulation). The bound the tests hold
(tests/test_kernels.py, ``BF16_FORECAST_ATOL``): forecasts within 5e-3 absolute of the float32
offline model over 100 steps (unit-normal inputs, H=32, L=2; measured 4e-4 for the torch step,
8e-4 for the kernel; on CUDA the kernel's gates come from tanh.approx.f32 under bfloat16 state,
``fast_math``, within the same bound); the engine's forecasts under bfloat16 state stay within the same bound of
its float32 ones. Float32 state keeps 1e-5 (the offline nn.LSTM, tests/test_engine.py).

The h/c block of a row: h of layer l at columns [l H, (l + 1) H), c of layer l at
[L H + l H, L H + (l + 1) H) (engine.StateLayout).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from torch import Tensor

from streamer.model import LSTMModel, StepWeights

try:  # Triton ships with CUDA builds of torch; the CPU path never needs it.
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

    class OutOfResources(Exception):  # type: ignore[no-redef]
        """Never raised without Triton."""

log = logging.getLogger(__name__)

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BLOCK_B = 64  # devices per Triton program
# Layer l+1's h and c loaded before layer l's maths: the loads wait on memory while the dots and
# gates run, where in order (the default) each layer waits on its own loads.
PRELOAD_BY_DEFAULT = False
# bfloat16 state on CUDA: gates from tanh.approx.f32 unless asked otherwise. On an H200 (H=64, L=2,
# B=131072, bench/gpu_check.py) 1.28e9 device-steps/s against 0.97e9 with exp and division; the
# forecasts stay within the bfloat16 bound (tests/test_kernels.py, on CUDA).
FAST_MATH_BY_DEFAULT = True
MIN_GEMM_ROWS = 8
# On the CPU a wave's step runs over at most this many rows at a time (Engine.max_rows_per_step).
CPU_ROWS_PER_STEP = 4096
# ... and over a multiple of this many: the rest of the rows point at the table's sink row. A row
# past the last whole block (of MKL's GEMM, 4 or 8 rows; of Inductor's vector loops, 16 floats on
# AVX-512) is summed or rounded by other code, and a device's result had depended on where in its
# batch it came: bitwise, not within 1e-5, but carried on in its state. Padded, every real row
# takes the whole blocks' code (tests/test_engine.py: 8 is too few, 16 enough). More costs batches
# of many small waves (a few devices with many readings each): 4,096 readings of 4 devices took
# 1.05x the time of 8-row padding at 16, 1.26x at 64 (eager; 1.03x and 1.21x compiled).
CPU_ROW_BLOCK = 16
assert CPU_ROW_BLOCK % MIN_GEMM_ROWS == 0 and CPU_ROWS_PER_STEP % CPU_ROW_BLOCK == 0


def make_lstm_step(model: LSTMModel, device: torch.device, dtype: torch.dtype = torch.float32) -> "LstmStep":
    """The fused Triton step on CUDA (when Triton is importable), the torch step elsewhere.
    dtype: of h and c in the table, one of STATE_DTYPES (ValueError otherwise)."""
    if dtype not in STATE_DTYPES.values():
        raise ValueError(f"state dtype {dtype} is not one of {', '.join(STATE_DTYPES)}")
    if device.type == "cuda" and triton is not None:
        return fused_if_it_launches(TritonLstmStep(model, device, dtype), lambda: TorchLstmStep(model, device, dtype))
    return TorchLstmStep(model, device, dtype)


def fused_if_it_launches(fused: "TritonLstmStep", fallback: Callable[[], "LstmStep"]) -> "LstmStep":
    """``fused`` if a trial launch of it goes through, else ``fallback()``, with one warning.

    The kernel holds a gate's weight blocks (padded to powers of two) in shared memory, and Triton
    refuses its first launch (OutOfResources) where they do not fit the GPU's: on an H200
    (232,448 bytes a block) bfloat16 state at hidden size 256 needs 294,912 and float32 state at
    input size 300 needs 262,144 (compiled for sm_90 ahead of time, 2026-11-30). The torch step
    has no such bound: larger models are served by it, not refused at their first step."""
    try:
        fused.trial_launch()
    except OutOfResources as exc:
        log.warning("the fused CUDA step does not fit this GPU for hidden size %d, input size %d (%s): the torch"
                    " step serves instead", fused.hidden_size, fused.input_size, exc)
        return fallback()
    except Exception as exc:  # noqa: BLE001 - any other refusal: the torch step needs none of it
        # Triton builds each kernel's launcher with a C compiler on its first launch, and writes
        # both to its cache directory: an image without gcc, or with a read-only home, refused it
        # here with a RuntimeError, and the GPU instance died before serving a reading.
        log.warning("the fused CUDA step could not be launched (%s: %s): the torch step serves instead; Triton needs"
                    " a C compiler and a writable TRITON_CACHE_DIR", type(exc).__name__, exc)
        return fallback()
    return fused


class LstmStep:
    """Advance B devices by one reading, reading and writing h and c in the table.

    ``fused``: one Triton kernel does the whole step. ``reads_lead``: the step reads h and c
    from ``lead`` itself, so ``rows`` need not hold them (see ``__call__``).
    """

    fused = False
    reads_lead = False
    num_layers: int
    hidden_size: int
    state_dtype: torch.dtype

    def __call__(self, x: Tensor, slots: Tensor, rows: Tensor | None, lead: Tensor) -> Tensor:
        """x: (B, input_size) float32; slots: (B,) int64, distinct; rows: (B, >= 2 L H) float32
        rows the caller gathered at ``slots`` (h and c in front; unused when ``reads_lead``); lead:
        the table's (capacity, 2 L H) h/c block in ``state_dtype`` (may be a strided view).
        Writes h' and c' into lead[slots]; returns the head's output (B, output_size) float32.
        """
        raise NotImplementedError


def _lstm_weights(model: LSTMModel) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    """Float32 copies on the CPU of StepWeights' layout: per layer (in_l + H, 4H), b_ih + b_hh;
    the head (H, F), (F,)."""
    ref = StepWeights(model, torch.device("cpu"))
    return [w.clone() for w in ref.w], [b.clone() for b in ref.b], ref.head_w, ref.head_b


def torch_step_weights(
    model: LSTMModel, device: torch.device, dot_dtype: torch.dtype
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    """The torch step's weights: per layer (in_l + H, 4H) and its bias in ``dot_dtype`` (the
    projections' operands), the cell gate's columns doubled, so that one sigmoid serves all four
    gates (tanh(g) = 2 sigmoid(2 g) - 1); the head's in float32."""
    w, b, head_w, head_b = _lstm_weights(model)
    hs = model.lstm.hidden_size
    for layer in range(model.lstm.num_layers):
        w[layer][:, 2 * hs : 3 * hs] *= 2.0
        b[layer][2 * hs : 3 * hs] *= 2.0
    return ([m.to(device, dot_dtype) for m in w], [v.to(device, dot_dtype) for v in b], head_w.to(device),
            head_b.to(device))


class TorchLstmStep(LstmStep):
    """The step in torch ops, on the rows the engine gathered (see the module docstring).

    Under bfloat16 state the projections take bfloat16 operands (x, h, weights) as the fused
    kernel's do; oneDNN runs them about 4x faster than float32 on CPUs with AVX512-BF16 or AMX,
    and rounds the pre-activations to bfloat16. The gate maths, c and the head stay float32.
    """

    def __init__(self, model: LSTMModel, device: torch.device, dtype: torch.dtype = torch.float32):
        self.num_layers = model.lstm.num_layers
        self.hidden_size = model.lstm.hidden_size
        self.state_dtype = dtype
        self.input_size = model.lstm.input_size
        self.dot_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        # float32 state: h and c come with the rows (one gather). bfloat16: gathered here from
        # the table as they are, not widened to float32 and narrowed again for the projections.
        self.reads_lead = dtype != torch.float32
        self.w, self.b, self.head_w, self.head_b = torch_step_weights(model, device, self.dot_dtype)
        self._buffers: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._lead_rows: dict[int, Tensor] = {}  # h and c gathered from the table, per row count

    def _buffers_for(self, m: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(layer input (m, max in + H) in the dot dtype, its gates (m, 4H), the gates in float32,
        h'|c' (m, 2 L H) float32), reused per row count."""
        bufs = self._buffers.get(m)
        if bufs is None:
            hs, lay = self.hidden_size, self.num_layers
            width = max(self.input_size, hs) + hs
            gates = torch.zeros(m, 4 * hs, device=device)
            bufs = (torch.zeros(m, width, device=device, dtype=self.dot_dtype),
                    gates if self.dot_dtype == torch.float32 else gates.to(self.dot_dtype), gates,
                    torch.zeros(m, 2 * lay * hs, device=device))
            if len(self._buffers) > 8:  # a few sizes recur (full chunks, a tail): keep those
                self._buffers.clear()
            self._buffers[m] = bufs
        return bufs

    def __call__(self, x: Tensor, slots: Tensor, rows: Tensor | None, lead: Tensor) -> Tensor:
        if self.reads_lead:
            # Into a buffer kept per row count: a fresh one faults its pages in on every call.
            held = self._lead_rows.get(len(slots))
            if held is None:
                if len(self._lead_rows) > 8:
                    self._lead_rows.clear()
                held = self._lead_rows[len(slots)] = torch.empty(len(slots), lead.shape[1], dtype=lead.dtype,
                                                                 device=lead.device)
            rows = torch.index_select(lead, 0, slots, out=held)
        elif rows is None:
            raise ValueError("TorchLstmStep needs the gathered rows")
        b, hs, lay = len(x), self.hidden_size, self.num_layers
        lh = lay * hs
        # MKL's sgemm takes another path below MIN_GEMM_ROWS rows, whose sums differ in the last
        # bits: padding keeps a device's result independent of the batch it came in.
        m = max(b, MIN_GEMM_ROWS)
        cat, dot_gates, gates, new = self._buffers_for(m, x.device)
        inp_width = x.shape[1]
        cat[:b, :inp_width] = x
        if rows.dtype != new.dtype:  # c to float32 in its own slot of h'|c', updated there in place
            new[:b, lh:].copy_(rows[:, lh : 2 * lh])
        for layer in range(lay):
            k = inp_width + hs
            cat[:b, inp_width:k] = rows[:, layer * hs : (layer + 1) * hs]
            torch.addmm(self.b[layer], cat[:, :k], self.w[layer], out=dot_gates)
            if dot_gates is not gates:
                gates.copy_(dot_gates)
            gates.sigmoid_()
            i, f, s, o = gates[:b].chunk(4, dim=1)  # s = sigmoid(2 g): tanh(g) = 2 s - 1
            c_new = new[:b, lh + layer * hs : lh + (layer + 1) * hs]
            h_new = new[:b, layer * hs : (layer + 1) * hs]
            # c' = f c + i tanh(g) = f c + 2 i s - i
            if rows.dtype == new.dtype:
                torch.mul(f, rows[:, lh + layer * hs : lh + (layer + 1) * hs], out=c_new)
            else:  # a product of mixed dtypes takes torch's slow path: c is float32 in c_new already
                c_new.mul_(f)
            c_new.addcmul_(i, s, value=2.0).sub_(i)
            # h' = o tanh(c') = o - 2 o sigmoid(-2 c'), computed in h's slot of the buffer.
            torch.mul(c_new, -2.0, out=h_new).sigmoid_()
            torch.addcmul(o, o, h_new, value=-2.0, out=h_new)
            cat[:b, :hs] = h_new
            inp_width = hs
        out = torch.addmm(self.head_b, new[:, (lay - 1) * hs : lh], self.head_w)[:b]
        hc = new[:b]
        if lead.dtype != hc.dtype:  # narrowed in the buffer h and c were gathered into (it is read by now)
            hc = rows.copy_(hc)
        lead.index_copy_(0, slots, hc)
        return out


def _next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


class TritonLstmStep(LstmStep):
    """The fused kernel (see the module docstring). Weights are packed once: per layer and gate,
    a (K, HP) block padded with zeros to powers of two (HP >= H, K >= in), in the dot dtype."""

    fused = True
    reads_lead = True

    def __init__(
        self,
        model: LSTMModel,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        block_b: int = BLOCK_B,
        num_warps: int = 4,
        dot_precision: str = "tf32x3",
        fast_math: bool | None = None,
        preload: bool = PRELOAD_BY_DEFAULT,
        maxnreg: int | None = None,
        num_stages: int | None = None,
    ):
        """dot_precision: of float32 tl.dot (float32 state): "tf32x3" (three TF32 products,
        float32 accuracy on tensor cores) or "ieee" (plain FMA: slower, and slow to compile).
        fast_math: sigmoid and tanh from the GPU's tanh.approx.f32 (one special-function
        instruction instead of exp and a division; relative error about 2**-11), for bfloat16
        state only (float32 state keeps its 1e-5 bound), compiled for CUDA only (inline PTX,
        which Triton's interpreter cannot run). None: on wherever it may be (FAST_MATH_BY_DEFAULT).
        preload: every layer's h and c asked for before the first layer's maths (see
        PRELOAD_BY_DEFAULT). maxnreg: a cap on registers per thread (ptxas's .maxnreg), for a
        benchmark's sweep; None: the compiler's choice. num_stages: Triton's software pipelining
        depth (None: its default).
        """
        if triton is None:
            raise RuntimeError("the fused LSTM step needs Triton, which this torch build lacks")
        allowed = dtype == torch.bfloat16 and device.type == "cuda"
        if fast_math and not allowed:
            raise ValueError("fast_math is for bfloat16 state on CUDA")
        self.fast_math = FAST_MATH_BY_DEFAULT and allowed if fast_math is None else fast_math
        w, b, head_w, head_b = _lstm_weights(model)
        self.num_layers = lay = model.lstm.num_layers
        self.hidden_size = hs = model.lstm.hidden_size
        self.input_size = n_in = model.lstm.input_size
        self.output_size = n_out = head_w.shape[1]
        self.state_dtype = dtype
        self.block_b = block_b
        self.num_warps = num_warps
        self.preload = preload
        options = {"maxnreg": maxnreg, "num_stages": num_stages}
        self.launch_options = {k: v for k, v in options.items() if v is not None}
        self.dot_precision = dot_precision if dtype == torch.float32 else "ieee"
        self.hp, self.inp, self.fp = _next_pow2(hs), _next_pow2(n_in), _next_pow2(n_out)
        dot = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        hp = self.hp

        def gate_blocks(m: Tensor, k_pad: int) -> Tensor:  # (k, 4H) -> (k_pad, 4 HP)
            out = torch.zeros(k_pad, 4 * hp)
            for g in range(4):
                out[: m.shape[0], g * hp : g * hp + hs] = m[:, g * hs : (g + 1) * hs]
            return out

        self.w_in0 = gate_blocks(w[0][:n_in], self.inp).to(device, dot)
        w_x = [gate_blocks(w[layer][:hs], hp) for layer in range(1, lay)] or [torch.zeros(hp, 4 * hp)]
        self.w_x = torch.stack(w_x).to(device, dot).contiguous()
        self.w_h = torch.stack(
            [gate_blocks(w[layer][w[layer].shape[0] - hs :], hp) for layer in range(lay)]
        ).to(device, dot).contiguous()
        bias = torch.zeros(lay, 4 * hp)
        for layer in range(lay):
            for g in range(4):
                bias[layer, g * hp : g * hp + hs] = b[layer][g * hs : (g + 1) * hs]
        self.bias = bias.to(device).contiguous()
        hw = torch.zeros(hp, self.fp)
        hw[:hs, :n_out] = head_w
        hb = torch.zeros(self.fp)
        hb[:n_out] = head_b
        self.head_w = hw.to(device).contiguous()  # float32: the head's maths are (see the kernel)
        self.head_b = hb.to(device).contiguous()

    def trial_launch(self) -> None:
        """One launch over a block of scratch rows (compiling the kernel): OutOfResources where
        this GPU cannot run it (see fused_if_it_launches)."""
        device, b = self.w_h.device, self.block_b
        lead = torch.zeros(b, 2 * self.num_layers * self.hidden_size, device=device, dtype=self.state_dtype)
        # Triton launches on the current device: the engine's own, as Engine._execute makes it.
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self(torch.zeros(b, self.input_size, device=device), torch.arange(b, device=device), None, lead)

    def __call__(self, x: Tensor, slots: Tensor, rows: Tensor | None, lead: Tensor) -> Tensor:
        b = len(slots)
        if x.shape != (b, self.input_size) or x.dtype != torch.float32:
            raise ValueError(f"x {tuple(x.shape)} {x.dtype} != ({b}, {self.input_size}) float32")
        if lead.dtype != self.state_dtype or lead.stride(1) != 1:
            raise ValueError(f"lead block {lead.dtype}, stride {lead.stride()} for a {self.state_dtype} step")
        x = x.contiguous()
        out = torch.empty(b, self.output_size, device=x.device, dtype=torch.float32)
        if b == 0:
            return out
        grid = (triton.cdiv(b, self.block_b),)
        _lstm_rows_kernel[grid](
            x, slots, lead, out, self.w_in0, self.w_x, self.w_h, self.bias, self.head_w, self.head_b,
            b, lead.stride(0),
            IN=self.input_size, INP=self.inp, H=self.hidden_size, HP=self.hp, L=self.num_layers,
            F=self.output_size, FP=self.fp, BLOCK_B=self.block_b,
            DOT_BF16=self.state_dtype == torch.bfloat16, UPCAST=x.device.type != "cuda", PREC=self.dot_precision,
            FAST=self.fast_math, PRELOAD=self.preload, num_warps=self.num_warps, **self.launch_options,
        )
        return out


if triton is not None:

    @triton.jit
    def _gates(inp, h, wx_ptr, wh_ptr, b_ptr, K: tl.constexpr, HP: tl.constexpr, G: tl.constexpr,
               UPCAST: tl.constexpr, PREC: tl.constexpr):
        """Pre-activation of gate G: inp (B, K) @ wx[:, G] + h (B, HP) @ wh[:, G] + b[G], float32.
        UPCAST: operands widened to float32 first (exact for bfloat16; the interpreter's bfloat16
        dot is wrong)."""
        n = tl.arange(0, HP)
        k = tl.arange(0, K)
        kh = tl.arange(0, HP)
        wx = tl.load(wx_ptr + k[:, None] * (4 * HP) + G * HP + n[None, :])
        wh = tl.load(wh_ptr + kh[:, None] * (4 * HP) + G * HP + n[None, :])
        if UPCAST:
            inp, h, wx, wh = inp.to(tl.float32), h.to(tl.float32), wx.to(tl.float32), wh.to(tl.float32)
        acc = tl.dot(inp, wx, input_precision=PREC)
        acc = tl.dot(h, wh, acc, input_precision=PREC)
        return acc + tl.load(b_ptr + G * HP + n)[None, :]

    @triton.jit
    def _add(a, b):
        """tl.sum's combine, ours: tl.sum is a library @jit function (see _tanh)."""
        return a + b

    @triton.jit
    def _tanh(v, FAST: tl.constexpr):
        """tanh(v) = 2 sigmoid(2 v) - 1, written out (tl.sigmoid is a library @jit function, which
        the interpreter cannot call unless it was on at import); FAST: tanh.approx.f32."""
        if FAST:
            return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [v], dtype=tl.float32,
                                             is_pure=True, pack=1)
        return 2.0 / (1.0 + tl.exp(-2.0 * v)) - 1.0

    @triton.jit
    def _sigmoid(v, FAST: tl.constexpr):
        if FAST:
            return 0.5 * _tanh(0.5 * v, FAST) + 0.5
        return 1.0 / (1.0 + tl.exp(-v))

    @triton.jit
    def _load_hc(base, hmask, LAYER: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, L: tl.constexpr):
        """Layer LAYER's h and c of a block of devices, in the state dtype."""
        kh = tl.arange(0, HP)
        h = tl.load(base + LAYER * H + kh[None, :], mask=hmask, other=0.0)
        c = tl.load(base + (L + LAYER) * H + kh[None, :], mask=hmask, other=0.0)
        return h, c

    @triton.jit
    def _cell(inp, h, c, base, hmask, wx_ptr, wh_ptr, b_ptr, LAYER: tl.constexpr, K: tl.constexpr,
              H: tl.constexpr, HP: tl.constexpr, L: tl.constexpr, DOT_BF16: tl.constexpr, UPCAST: tl.constexpr,
              PREC: tl.constexpr, FAST: tl.constexpr):
        """One layer for a block of devices, from its h, c as loaded: stores h', c' at ``base``;
        returns h'."""
        kh = tl.arange(0, HP)
        c = c.to(tl.float32)
        if DOT_BF16:
            h = h.to(tl.bfloat16)
        else:
            h = h.to(tl.float32)
        # Gate by gate, folded into c' at once: fewer (BLOCK_B, HP) tiles live at a time.
        f = _sigmoid(_gates(inp, h, wx_ptr, wh_ptr, b_ptr, K, HP, 1, UPCAST, PREC), FAST)
        c_new = f * c
        i = _sigmoid(_gates(inp, h, wx_ptr, wh_ptr, b_ptr, K, HP, 0, UPCAST, PREC), FAST)
        c_new += i * _tanh(_gates(inp, h, wx_ptr, wh_ptr, b_ptr, K, HP, 2, UPCAST, PREC), FAST)
        o = _sigmoid(_gates(inp, h, wx_ptr, wh_ptr, b_ptr, K, HP, 3, UPCAST, PREC), FAST)
        h_new = o * _tanh(c_new, FAST)
        tl.store(base + LAYER * H + kh[None, :], h_new.to(base.dtype.element_ty), mask=hmask)
        tl.store(base + (L + LAYER) * H + kh[None, :], c_new.to(base.dtype.element_ty), mask=hmask)
        return h_new

    @triton.jit
    def _lstm_rows_kernel(
        x_ptr, slot_ptr, hc_ptr, out_ptr, w_in0_ptr, w_x_ptr, w_h_ptr, b_ptr, hw_ptr, hb_ptr,
        n_rows, hc_stride,
        IN: tl.constexpr, INP: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, L: tl.constexpr,
        F: tl.constexpr, FP: tl.constexpr, BLOCK_B: tl.constexpr, DOT_BF16: tl.constexpr, UPCAST: tl.constexpr,
        PREC: tl.constexpr, FAST: tl.constexpr, PRELOAD: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        live = r < n_rows
        slot = tl.load(slot_ptr + r, mask=live, other=0)
        base = hc_ptr + slot[:, None] * hc_stride
        kh = tl.arange(0, HP)
        hmask = live[:, None] & (kh[None, :] < H)
        kin = tl.arange(0, INP)
        inp = tl.load(x_ptr + r[:, None] * IN + kin[None, :], mask=live[:, None] & (kin[None, :] < IN), other=0.0)
        if DOT_BF16:
            inp = inp.to(tl.bfloat16)
        h_state, c_state = _load_hc(base, hmask, 0, H, HP, L)
        if PRELOAD and L > 1:  # the next layer's h, c asked for before this layer's maths
            h_next, c_next = _load_hc(base, hmask, 1, H, HP, L)
        h = _cell(inp, h_state, c_state, base, hmask, w_in0_ptr, w_h_ptr, b_ptr, 0, INP, H, HP, L, DOT_BF16, UPCAST,
                  PREC, FAST)
        for layer in tl.static_range(1, L):
            if PRELOAD:
                h_state, c_state = h_next, c_next
                if layer + 1 < L:
                    h_next, c_next = _load_hc(base, hmask, layer + 1, H, HP, L)
            else:
                h_state, c_state = _load_hc(base, hmask, layer, H, HP, L)
            if DOT_BF16:
                h_in = h.to(tl.bfloat16)
            else:
                h_in = h
            h = _cell(h_in, h_state, c_state, base, hmask, w_x_ptr + (layer - 1) * HP * 4 * HP,
                      w_h_ptr + layer * HP * 4 * HP, b_ptr + layer * 4 * HP, layer, HP, H, HP, L, DOT_BF16, UPCAST,
                      PREC, FAST)
        # The head in float32, column by column (F is a few outputs): a row's products summed, as
        # the torch step's addmm. Not tl.dot: on an H200 (Triton 3.6, wgmma) the (BLOCK_B, H) x
        # (H, 16) product of the head was wrong in some launch shapes with bfloat16 state (64 rows,
        # 4 warps: 0.29 off at 4k rows, up to 1e38 and different from run to run at 16k and more),
        # the state right (gpu_check's forecast_err; tests/test_kernels.py's large batch on CUDA).
        for f in tl.static_range(F):
            w = tl.load(hw_ptr + kh * FP + f)
            out = tl.reduce(h * w[None, :], 1, _add) + tl.load(hb_ptr + f)
            tl.store(out_ptr + r * F + f, out, mask=live)
