"""streamer.gamma: the vectorised ln Q(a, x) of the compiled step against torch's float64 gammaincc."""

import math

import pytest
import torch

from streamer.anomaly import LOG_MIN_TAIL, SHAPE_RANGE
from streamer.gamma import TEMME_FROM, X_CAP, lgamma, log_gamma_q

# The bound streamer.gamma states, where Q >= 1e-30 (streamer.anomaly's MIN_TAIL).
BOUND = 3e-5


def grid() -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (a, x) over the anomaly model's shapes: x over 11 decades, and x / a around 1,
    where each method is at its weakest, and around a + 1, where the small shapes change method."""
    a = torch.logspace(math.log10(SHAPE_RANGE[0]), math.log10(SHAPE_RANGE[1]), 350, dtype=torch.float64)
    x = torch.logspace(-8, 3.5, 500, dtype=torch.float64)
    ratio = torch.cat([torch.linspace(0.5, 1.5, 201, dtype=torch.float64), torch.logspace(-4, 2, 100, dtype=torch.float64)])
    a1, x1 = torch.meshgrid(a, x, indexing="ij")
    a2, r2 = torch.meshgrid(a, ratio, indexing="ij")
    a3, d3 = torch.meshgrid(a[a < TEMME_FROM], torch.linspace(-0.2, 0.2, 41, dtype=torch.float64), indexing="ij")
    points_a = torch.cat([a1.flatten(), a2.flatten(), a3.flatten()])
    points_x = torch.cat([x1.flatten(), (a2 * r2).flatten(), (a3 + 1.0 + d3).clamp_min(0.0).flatten()])
    return points_a.float(), points_x.float()


def worst_error(got: torch.Tensor, a: torch.Tensor, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    want = torch.log(torch.special.gammaincc(a.double(), x.double()))
    live = want > LOG_MIN_TAIL
    error = torch.where(live, (got.double() - want).abs(), torch.zeros_like(want))
    assert not torch.isnan(error).any()
    # Where Q is below 1e-30 the anomaly model takes its asymptotic form: it needs only to know.
    assert (got[~live] <= LOG_MIN_TAIL + 1e-4).all()
    return float(error.max()), want


def test_log_gamma_q_is_within_its_bound_of_torchs_float64_gammaincc():
    a, x = grid()
    got = log_gamma_q(a, x)
    assert got.dtype == torch.float32
    error, want = worst_error(got, a, x)
    assert error <= BOUND, error
    # torch's own float32 gammaincc, the eager step's, for scale: the bound is well inside its error.
    own = torch.log(torch.special.gammaincc(a, x)).double()
    live = want > LOG_MIN_TAIL
    assert float((own - want)[live].abs().max()) > 10 * BOUND


def test_log_gamma_q_compiled_is_within_the_same_bound():
    """Compiled as the step compiles it (contraction, Inductor's vectorised loops)."""
    from streamer.compiled import COMPILE_OPTIONS

    a, x = grid()
    compiled = torch.compile(log_gamma_q, fullgraph=True, options=COMPILE_OPTIONS)
    error, _ = worst_error(compiled(a, x), a, x)
    assert error <= BOUND, error


def test_log_gamma_q_edges():
    a = torch.tensor([1e-3, 1.0, 5.0, 50.0, 1e4, float("nan"), 2.0, 2.0, 50.0, 2.0])
    x = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, float("nan"), 1e12, 1e12, 2 * X_CAP])
    got = log_gamma_q(a, x)
    assert got[:5].tolist() == [0.0] * 5  # Q(a, 0) = 1
    assert torch.isnan(got[5:7]).all()  # NaN in, NaN out, as gammaincc's
    assert (got[7:] <= LOG_MIN_TAIL).all() and not torch.isnan(got[7:]).any()  # far past the cap: deep, not NaN


@pytest.mark.parametrize("low, high", [(1e-3, 1.0), (1.0, 20.0), (20.0, 1e4)])
def test_lgamma_is_torchs(low: float, high: float):
    a = torch.logspace(math.log10(low), math.log10(high), 2000, dtype=torch.float64)
    assert float((lgamma(a) - torch.lgamma(a)).abs().max()) <= 1e-10
