"""ln Q(a, x), the regularised upper incomplete gamma function, in loops a compiler vectorises.

torch.special.gammaincc is Cephes' algorithm: per element, a choice of method and a loop run
until it converges. Inductor cannot vectorise it: in the compiled CPU step (streamer.compiled)
the anomaly score's two tails per reading were one scalar loop, about 40 ns an element, a
quarter of the whole step. Here the same function is straight-line code over whole tensors:
every element takes every method, for a fixed number of terms, and keeps the one that applies to
it (the others' values, overflowed or not, are dropped by a select). Computed in float64 from
float32 inputs (but for erfc and the last logarithms, taken in float32, which is cheaper and
enough there), for the shapes the anomaly model uses (a in [1e-3, 1e4], streamer.anomaly's
SHAPE_RANGE) and every finite x >= 0, it is within 3e-5 of ln Q where Q >= 1e-30 (2.5e-5 at
most in 6 million random points; float32's erfc near 1e-30), and 5e-6 where Q >= 1e-10 (tests/test_gamma.py measures it against torch's float64 gammaincc; torch's float32
one is within 7e-4); below 1e-30 the anomaly model takes its asymptotic form.

- a >= TEMME_FROM: Temme's uniform asymptotic expansion (DLMF 8.12.9-8.12.11) with its first
  three coefficient functions in closed form (their Taylor series near eta = 0, where the closed
  forms cancel): Q = erfc(eta sqrt(a / 2)) / 2 + exp(-a eta^2 / 2) / sqrt(2 pi a) (c0 + c1 / a
  + c2 / a^2); the first term left out is c3 / a^3, c3(0) = 6.5e-4.
- a < TEMME_FROM, x < a + 1: the series of P(a, x) = 1 - Q over SERIES_TERMS terms, summed as
  one fraction (no division per term).
- a < TEMME_FROM, x >= a + 1: Legendre's continued fraction of Q over CF_TERMS terms, by its
  three-term recurrence (one division at the end). x is capped at X_CAP there: beyond it Q is
  below 1e-100 for every a < TEMME_FROM, and the recurrence would overflow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TEMME_FROM = 10.0
SERIES_TERMS = 20
CF_TERMS = 16
X_CAP = 300.0
# Below this |eta| the closed forms of c0..c2 cancel to noise: their Taylor series instead.
SMALL_ETA = 1e-2
HALF_LN_2PI = 0.5 * math.log(2.0 * math.pi)
# Stirling's series for ln Gamma(z): 1 / (12 z) - 1 / (360 z^3) + 1 / (1260 z^5) - 1 / (1680 z^7).
STIRLING = (1.0 / 12.0, -1.0 / 360.0, 1.0 / 1260.0, -1.0 / 1680.0)
LGAMMA_SHIFT = 7  # Stirling's series at a + 7 >= 7 (error < 1e-11), shifted down by a product


def lgamma(a: Tensor) -> Tensor:
    """ln Gamma(a) of a float64 tensor, a > 0 up to about 1e40 (the shift's product stays
    finite): Stirling's series at a + LGAMMA_SHIFT, less the log of a (a + 1) ... (a + 6).
    Within 1e-11 of torch.lgamma; torch's own is a scalar loop in Inductor's C++."""
    z = a + float(LGAMMA_SHIFT)
    product = a
    for k in range(1, LGAMMA_SHIFT):
        product = product * (a + float(k))
    inverse = 1.0 / z
    inverse2 = inverse * inverse
    series = STIRLING[-1]
    for coefficient in reversed(STIRLING[:-1]):
        series = series * inverse2 + coefficient
    return (z - 0.5) * torch.log(z) - z + HALF_LN_2PI + series * inverse - torch.log(product)


def _temme(a: Tensor, x: Tensor) -> Tensor:
    """ln Q(a, x) by Temme's expansion; a, x float64, a > 0, x >= 0."""
    t = x / a - 1.0  # lambda - 1
    half_eta2 = t - torch.log1p(t)  # lambda - 1 - ln lambda = eta^2 / 2 >= 0
    root = torch.sqrt(2.0 * half_eta2)
    eta = torch.where(t < 0.0, -root, root)
    small = root < SMALL_ETA
    e = torch.where(small, torch.ones_like(eta), eta)  # no division by a vanishing eta
    u = torch.where(small, torch.ones_like(t), 1.0 / t)
    c0 = torch.where(small, -1.0 / 3.0 + eta * (1.0 / 12.0 - eta * (2.0 / 135.0)), u - 1.0 / e)
    c1 = torch.where(small, -1.0 / 540.0 - eta * (1.0 / 288.0), 1.0 / (e * e * e) - u * (u * (u + 1.0) + 1.0 / 12.0))
    e2 = e * e
    c2 = torch.where(  # c2's slope at 0 to three digits: c2 / a^2 (a >= 10) needs no more
        small,
        25.0 / 6048.0 - 0.00268 * eta,
        -3.0 / (e2 * e2 * e) + (1.0 + u) * u * u * (u * (3.0 * u + 2.0) + 1.0 / 12.0) + u * (1.0 / 288.0),
    )
    rest = torch.exp(-a * half_eta2) / torch.sqrt((2.0 * math.pi) * a) * (c0 + (c1 + c2 / a) / a)
    return torch.log((0.5 * torch.special.erfc((eta * torch.sqrt(0.5 * a)).float()).double() + rest).float())


def _series_or_fraction(a: Tensor, x: Tensor) -> Tensor:
    """ln Q(a, x) for a < TEMME_FROM by P's series (x < a + 1) or Q's continued fraction."""
    x = x.clamp(max=X_CAP)
    log_x = torch.log(x)
    lgamma_a1 = lgamma(a + 1.0)
    # P = x^a e^-x / Gamma(a + 1) * sum_n x^n / ((a + 1) ... (a + n)), the sum as num / den.
    num = torch.ones_like(x)
    den = torch.ones_like(x)
    power = torch.ones_like(x)
    for n in range(1, SERIES_TERMS + 1):
        power = power * x
        num = num * (a + float(n)) + power
        den = den * (a + float(n))
    p = torch.exp(a * log_x - x - lgamma_a1) * (num / den)
    by_series = torch.log((1.0 - p).float())
    # Q = x^a e^-x / Gamma(a) / (b1 + a2 / (b2 + a3 / (b3 + ...))), b_n = x + 2n - 1 - a,
    # a_(n+1) = -n (n - a): the convergent A_n / B_n by A_n = b_n A_(n-1) + a_n A_(n-2).
    num0, den0 = torch.zeros_like(x), torch.ones_like(x)
    num1, den1 = torch.ones_like(x), x + (1.0 - a)
    for n in range(2, CF_TERMS + 1):
        b = x + (2.0 * n - 1.0) - a
        k = (1.0 - n) * (float(n - 1) - a)
        num0, num1 = num1, b * num1 + k * num0
        den0, den1 = den1, b * den1 + k * den0
    by_fraction = (a * log_x - x - lgamma_a1).float() + torch.log((a * num1 / den1).float())
    return torch.where(x < a + 1.0, by_series, by_fraction)


def log_gamma_q(a: Tensor, x: Tensor) -> Tensor:
    """ln Q(a, x) of float32 tensors a in [1e-3, 1e4] and finite x >= 0, as float32 (see the
    module docstring for the error bound); NaN where an input is NaN (and, as torch's asymptotic
    form in streamer.anomaly, where x is infinite and a >= TEMME_FROM)."""
    a64, x64 = a.double(), x.double()
    by_temme = _temme(a64, x64)
    small = _series_or_fraction(a64.clamp(max=TEMME_FROM), x64)
    return torch.where(a64 >= TEMME_FROM, by_temme, small)
