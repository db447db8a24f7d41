"""A wave's step compiled by torch.compile (Inductor's C++ backend): `model.compile` on the CPU.

Eager, a wave's step is about 30 torch ops (the LSTM's gates, the residual statistics, the
records), each a pass over the wave's rows in memory; on the CPU they, not the projections, bound
the step. Here the same maths, from reading the wave's rows in the table to writing them back,
is one function, which Inductor fuses into a few vectorised loops around the two projections
(still oneDNN/MKL calls). On this project's 2-core host, whole steps: 2.0x-2.3x eager with
bfloat16 state, 1.3x-1.7x with float32 (see README, State table).

The maths is the eager step's (Engine._step_wave, kernels.TorchLstmStep), written without out=
buffers or host syncs so that it traces as one graph; the tests hold the two to each other.
Compiling takes seconds (a C++ compiler must be on the PATH): it happens when the engine is
built (and when a model of a new shape is swapped in), never in a step, and Inductor keeps what
it built in its on-disk cache for the next start. Every row count shares one compiled graph (the
batch dimension is dynamic; the engine pads each chunk to a multiple of kernels.CPU_ROW_BLOCK
rows, and the graph is shown no fewer than MIN_GEMM_ROWS). Should it not take a
step's inputs, that step and the later ones run the same maths eagerly, with a warning, rather
than compile in the stream.
"""

from __future__ import annotations

import gc
import logging
import time
import types
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from streamer.anomaly import AnomalyParams
from streamer.errors import StreamerError
from streamer.kernels import CPU_ROWS_PER_STEP, MIN_GEMM_ROWS, torch_step_weights
from streamer.model import LSTMModel
from streamer.wave import not_finite, row_after, score_wave

if TYPE_CHECKING:
    from streamer.engine import StateLayout
    from streamer.state import DeviceStateTable

log = logging.getLogger(__name__)


# tanh(x) ~ x P(x^2) / Q(x^2) for |x| <= TANH_CLAMP: a rational fit of tanh over [0, 9] (near
# minimax in float64, 6e-9; bench/tanh_fit.py makes it). Evaluated in float32 it is within 4e-7
# of tanh everywhere (tests/test_compiled.py), about 3x rounding's own error, and it is one
# vectorised loop of products, sums and a division, where Inductor's sigmoid and tanh each take
# an exponential (SLEEF's, to 1 ulp) and a division. The gate loops alone, timed in turn with
# torch's sigmoid (bench/bench.py, cpu_gate_ceiling): 1.16x-1.20x on this project's host, and
# 3.3x once when its exponentials ran slower.
TANH_P = (0.99999996893, 0.13079155061, 0.0030986446853, 1.1101721879e-05, -2.0029149744e-08,
          5.1924964542e-11, -8.2908145092e-14)
TANH_Q = (1.0, 0.46412475309, 0.024473723248, 0.00025385870998)
# Beyond this the fit's float32 value would pass 1; tanh(7.9) is 1 - 2.8e-7.
TANH_CLAMP = 7.9


def _poly(coefficients: tuple[float, ...], t: Tensor) -> Tensor:
    value = t * coefficients[-1] + coefficients[-2]
    for coefficient in reversed(coefficients[:-2]):
        value = value * t + coefficient
    return value


def tanh_fraction(x: Tensor, saturate: bool = False) -> tuple[Tensor, Tensor]:
    """fast_tanh(x) as its numerator and denominator (p, q), q in [1, 187.002]: a product of such
    fractions takes one division where their values would take one each. ``saturate``: p is +-q
    past the clamp, the fraction exactly +-1 as torch's float32 tanh is from |x| = 9.011 on;
    otherwise the fit's value at the clamp, +-(1 - 2.8e-7), two more operations saved."""
    clamped = x.clamp(-TANH_CLAMP, TANH_CLAMP)
    t = clamped * clamped
    p, q = clamped * _poly(TANH_P, t), _poly(TANH_Q, t)
    if saturate:
        p = torch.where(x >= TANH_CLAMP, q, torch.where(x <= -TANH_CLAMP, -q, p))
    return p, q


def fast_tanh(x: Tensor) -> Tensor:
    """tanh of a float32 tensor within 4e-7, |result| <= 1 (exactly +-1 past the clamp), NaN
    kept: products, sums and one division per element, which Inductor fuses into the loop around
    it."""
    p, q = tanh_fraction(x, saturate=True)
    return p / q


def lstm_cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """A layer's gate maths, in float32 from its pre-activations (B, 4H) in the weights' dtype,
    cell-gate columns doubled (torch_step_weights): (c', h'). Every sigmoid and tanh is a tanh:
    sigmoid(x) = (1 + tanh(x / 2)) / 2, and tanh(g) of the doubled column 2g.

    Compiled, each tanh is fast_tanh's fraction p / q, fused into one loop over the gates (no
    (B, 4H) buffer between them), and the fractions of a product share a division: (1 + tf) is
    (qf + pf) / qf, (1 + ti) tg is (qi + pi) pg / (qi qg), (1 + to) tanh(c') is (qo + po) pc /
    (qo qc). Three divisions a hidden unit instead of five, as accurate (tests/test_compiled.py).
    Run eagerly (a step the compiled graph does not take), torch's tanh, one op instead of a
    dozen."""
    if not torch.compiler.is_compiling():
        ti, tf, tg, to = (torch.tanh(0.5 * g) for g in gates.float().chunk(4, dim=1))
        c_next = 0.5 * ((1.0 + tf) * c + (1.0 + ti) * tg)
        return c_next, 0.5 * (1.0 + to) * torch.tanh(c_next)
    # The input and forget gates saturate exactly (0 or 1): what they let through stays in c, and
    # the fit's sigmoids at the clamp, 1.4e-7 and 1 - 1.4e-7, leaked into a held cell, or decayed
    # it, by that much a step: 1e-5 off in a few thousand steps (tests/test_compiled.py). The
    # output gate's and the tanh's values at the clamp err by 2.8e-7 at most and do not build up.
    i, f, g, o = gates.float().chunk(4, dim=1)
    (pi, qi), (pf, qf) = tanh_fraction(0.5 * i, saturate=True), tanh_fraction(0.5 * f, saturate=True)
    (pg, qg), (po, qo) = tanh_fraction(0.5 * g), tanh_fraction(0.5 * o)
    c_next = 0.5 * ((qf + pf) / qf * c + (qi + pi) * pg / (qi * qg))
    pc, qc = tanh_fraction(c_next)
    return c_next, 0.5 * (qo + po) * pc / (qo * qc)


def biased_weights(
    w: list[Tensor], b: list[Tensor], head_w: Tensor, head_b: Tensor
) -> tuple[list[Tensor], list[Tensor] | None, Tensor, Tensor]:
    """torch_step_weights as wave_maths takes them. Under bfloat16 each layer's bias is appended
    to its weights as their last row (b None): the projection is then one product, [x, h, 1] @
    [W; b], its bias summed in the float32 accumulator. oneDNN's bfloat16 addmm copies the bias
    into every row of its (B, 4H) output first and adds the product to it after, a pass over the
    output; the column of ones is written by the loop that writes [x, h]. On this project's
    host (4,096 rows, in one process): 0.84x addmm's time at layer 0's shape (K = 65) and at
    layer 1's (K = 128); whole compiled steps 1.06x (bench/engine_vs.py). Float32's addmm (MKL)
    adds its bias in the product, and is as fast as the product alone: kept (the folded form
    took 0.96x the step at 16k rows)."""
    if w[0].dtype != torch.bfloat16:
        return w, b, head_w, head_b
    return [torch.cat([w_l, b_l[None]], dim=0) for w_l, b_l in zip(w, b)], None, head_w, head_b


def wave_maths(
    x: Tensor,
    lead: Tensor,
    rest: Tensor,
    w: list[Tensor],
    b: list[Tensor] | None,
    head_w: Tensor,
    head_b: Tensor,
    layout: "StateLayout",
    anomaly: AnomalyParams,
    norm_alpha: float | None,
) -> tuple[Tensor, ...]:
    """One step of a wave's devices, from their gathered rows to their new ones.

    x: (B, input size) float32, values first; lead: (B, 2 L H) h and c in the state dtype;
    rest: (B, width - 2 L H) float32, the row from the forecast on (StateLayout). w, b, head_w,
    head_b: biased_weights of torch_step_weights (cell-gate columns doubled; b None where each
    layer's bias is its weights' last row). Returns (lead', rest', forecast, ln tail, flags,
    residual, not finite): the rows to write back and the wave's results, as _step_wave's.
    """
    base = layout.c.stop
    hs, lay = layout.hidden_size, layout.num_layers
    lh = lay * hs

    def col(columns: int | slice) -> Tensor:  # rest holds a row from its column ``base`` on
        if isinstance(columns, int):
            return rest[:, columns - base]
        return rest[:, columns.start - base : columns.stop - base]

    scores = score_wave(x, col, layout, anomaly, norm_alpha)

    # The LSTM, as TorchLstmStep: projections on operands of the weights' dtype (bfloat16 under
    # bfloat16 state, pre-activations rounded to it), gate maths and c in float32.
    dot = w[0].dtype
    inp = scores.x.to(dot)
    h_new: list[Tensor] = []
    c_new: list[Tensor] = []
    for layer in range(lay):
        h = lead[:, layer * hs : (layer + 1) * hs].to(dot)
        c = lead[:, lh + layer * hs : lh + (layer + 1) * hs].float()
        if b is None:  # the bias in the weights' last row, times a column of ones (biased_weights)
            gates = torch.mm(torch.cat([inp, h, inp.new_ones(inp.shape[0], 1)], dim=1), w[layer])
        else:
            gates = torch.addmm(b[layer], torch.cat([inp, h], dim=1), w[layer])
        c_next, h_next = lstm_cell(gates, c)
        h_new.append(h_next)
        c_new.append(c_next)
        inp = h_next.to(dot)
    # The head's few outputs as sums over H in the loops (a GEMV of N = 1 to 3 is mostly its call).
    head = (h_new[-1].unsqueeze(2) * head_w.unsqueeze(0)).sum(dim=1) + head_b
    rest_new, out = row_after(head, scores)
    # Each part rounded to the state's dtype before the cat, so that the gate loops write the new
    # rows straight into it: a float32 cat rounded afterwards had the loops write (and the next
    # loop read back) twice the bytes, and the whole step take 1.3x-1.8x as long under bfloat16
    # state (in one process, alternating).
    lead_new = torch.cat([part.to(lead.dtype) for part in h_new + c_new], dim=1)
    scored = scores.scored
    return (lead_new, rest_new, out, scored.log_tail, scored.is_anomaly, scores.residual,
            not_finite(out, scored.log_tail, scores.residual))


def wave_step(
    x: Tensor,
    slots: Tensor,
    blocks: tuple[Tensor, ...],
    w: list[Tensor],
    b: list[Tensor] | None,
    head_w: Tensor,
    head_b: Tensor,
    layout: "StateLayout",
    anomaly: AnomalyParams,
    norm_alpha: float | None,
) -> tuple[Tensor, ...]:
    """wave_maths on the rows of ``slots`` in the table's storage (DeviceStateTable.blocks),
    written back in place; returns (forecast, ln tail, flags, residual, not finite).

    Compiled, the gather is read by the loops that use it and the new rows are written from the
    loops that make them, in the table: no copy of the wave's rows each way. Slots may repeat
    only as the sink row of padding (whichever of its rows lands there)."""
    lead_width = layout.c.stop  # h and c of every layer, then the rest
    if len(blocks) == 1:
        rows = blocks[0].index_select(0, slots)
        lead, rest = rows[:, :lead_width], rows[:, lead_width:]
    else:
        lead, rest = blocks[0].index_select(0, slots), blocks[1].index_select(0, slots)
    lead_new, rest_new, *results = wave_maths(x, lead, rest, w, b, head_w, head_b, layout, anomaly, norm_alpha)
    if len(blocks) == 1:
        blocks[0].index_copy_(0, slots, torch.cat([lead_new, rest_new], dim=1))
    else:
        blocks[0].index_copy_(0, slots, lead_new)
        blocks[1].index_copy_(0, slots, rest_new)
    return tuple(results)


# Inductor's C++ options for the step. ffp-contract=fast lets the compiler fuse a product and the
# sum after it into one fused multiply-add (rounded once, not twice): fast_tanh's polynomials are
# such pairs, and Inductor compiles with contraction off. Whole steps against the tree before
# (bench/engine_vs.py, bench/results/cpu-2026-11-30-fma.jsonl): bfloat16 1.04x-1.09x, float32
# 1.02x-1.13x. The engine pads every chunk to CPU_ROW_BLOCK rows: contracted, a vector loop's
# tail rows are summed otherwise than its whole blocks (tests/test_engine.py).
COMPILE_OPTIONS = {"cpp.enable_floating_point_contract_flag": "fast"}

# The rows the compile is shown. Inductor decides which loops run on torch's threads from the
# sizes of the inputs it compiled with: shown 16 rows, the loop that scores the residuals (then
# torch's incomplete gamma function, not vectorised) ran on one thread in every step. A chunk of a large
# wave is what a step that matters takes.
WARM_UP_ROWS = CPU_ROWS_PER_STEP

_COMPILED: dict[tuple, Callable[..., tuple[Tensor, ...]]] = {}


def compiled_for(key: tuple) -> Callable[..., tuple[Tensor, ...]]:
    """wave_step compiled for one configuration (layout, anomaly parameters, normalisation,
    state dtype, input size), shared by every engine of that configuration in the process.

    Each configuration compiles a copy of wave_step's code of its own: Dynamo keeps compiled
    variants per code object and stops compiling after a few (torch._dynamo.config's
    recompile_limit), so engines of many configurations in one process (model swaps to new
    shapes, tests) would otherwise run out of them.
    """
    fn = _COMPILED.get(key)
    if fn is None:
        code = wave_step.__code__.replace()
        copy = types.FunctionType(code, wave_step.__globals__, wave_step.__name__, wave_step.__defaults__)
        fn = _COMPILED[key] = torch.compile(copy, fullgraph=True, options=COMPILE_OPTIONS)
    return fn


class CompiledWave:
    """Engine._step_wave through the compiled wave_step: the wave's rows stepped in the table."""

    def __init__(self, model: LSTMModel, table: "DeviceStateTable", layout: "StateLayout",
                 anomaly: AnomalyParams, norm_alpha: float | None) -> None:
        if table.device.type != "cpu":
            raise StreamerError(f"model.compile applies on the CPU only, not on {table.device}")
        self.table = table
        self.layout = layout
        self.anomaly = anomaly
        self.norm_alpha = norm_alpha
        dot = torch.bfloat16 if table.lead_dtype == torch.bfloat16 else torch.float32
        self.w, self.b, self.head_w, self.head_b = biased_weights(*torch_step_weights(model, table.device, dot))
        self.input_size = model.lstm.input_size
        self._blocks = table.blocks()
        # wave_step's arguments after the wave's own
        self._args = (self._blocks, self.w, self.b, self.head_w, self.head_b, layout, anomaly, norm_alpha)
        # Inductor builds its loops for the torch threads of the moment: part of the key.
        self._key = (layout, anomaly, norm_alpha, table.lead_dtype, self.input_size, torch.get_num_threads())
        cached = self._key in _COMPILED
        self._fn = compiled_for(self._key)
        self._eager = False  # set once the graph did not take a step's inputs: eager from then on
        self._warm_up(cached)

    def _warm_up(self, cached: bool) -> None:
        """Compile now, on the path the steps take (the table's own storage, here the sink's row
        stepped WARM_UP_ROWS times, under inference mode as Engine._execute runs): a compile in
        the stream would stall it. The batch dimension is marked dynamic, so one graph serves
        every row count."""
        started = time.perf_counter()
        rows = WARM_UP_ROWS
        failure = None
        try:
            with torch.inference_mode():
                x = torch.zeros(rows, self.input_size)
                slots = torch.full((rows,), self.table.sink, dtype=torch.int64)  # the sink's row, written
                for t in (x, slots):
                    torch._dynamo.mark_dynamic(t, 0, min=MIN_GEMM_ROWS)
                for block in self._blocks:  # one graph for tables of every capacity
                    torch._dynamo.mark_dynamic(block, 0)
                self._fn(x, slots, *self._args)
        except Exception as exc:  # a missing compiler, an unsupported op: one line, not Inductor's page
            _COMPILED.pop(self._key, None)  # not kept: the next engine of this configuration tries afresh
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            failure = f"model.compile: torch.compile failed ({first}); set model.compile = false to step eagerly"
        if not cached:
            # A compile leaves a graph's worth of cycles (FX nodes holding symbolic-shape tensors;
            # a failed one 100k objects, through its error's traceback). Freed here, on this
            # thread: left to the collector, any thread's allocation could free them, and a helper
            # thread doing so as the interpreter exited (SIGTERM just after start-up) aborted the
            # process in a tensor's C++ destructor ("terminate called without an active
            # exception", exit 134). Hence the error is raised after, outside the except: it
            # would keep Inductor's as its context, and the frames with it.
            gc.collect()
        if failure is not None:
            raise StreamerError(failure)
        if cached:  # an engine of this configuration compiled it before, in this process
            log.debug("the compiled CPU step of this configuration serves again")
        else:
            log.info("compiled the CPU step in %.1f s", time.perf_counter() - started)

    def __call__(self, x: Tensor, slots: Tensor) -> tuple[Tensor, ...]:
        # The engine pads every chunk to whole blocks of CPU_ROW_BLOCK rows (Engine._wave), never
        # fewer than the MIN_GEMM_ROWS the graph was compiled to take.
        if self._eager:
            results = wave_step(x, slots, *self._args)
        else:
            try:
                # Never a compile in the stream (seconds, and a failure there a traceback): inputs
                # the graph compiled at the build does not take are stepped by the same maths,
                # eagerly, and so are all later steps (each miss costs Dynamo's guard checks). The
                # stance is global: only the loop's thread runs compiled code.
                with torch.compiler.set_stance("fail_on_recompile"):
                    results = self._fn(x, slots, *self._args)
            except RuntimeError as exc:
                # This torch says "Detected recompile when torch.compile stance is
                # 'fail_on_recompile'"; anything else the step raised is the caller's.
                if "fail_on_recompile" not in str(exc):
                    raise
                self._eager = True
                reasons = [line.strip() for line in str(exc).splitlines() if line.strip().startswith("- ")]
                log.warning("the compiled CPU step does not take these inputs (%s): this model's steps run"
                            " eagerly from now on", "; ".join(reasons)[:500] or "a recompile")
                results = wave_step(x, slots, *self._args)  # the guards failed before anything ran
        return tuple(results)
