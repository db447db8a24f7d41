#!/usr/bin/env python3
"""How streamer.compiled's TANH_P and TANH_Q were made: tanh(x) ~ x P(x^2) / Q(x^2) on [0, 9],
P of degree 6 and Q of degree 3 in x^2 (Q's constant 1), fitted in float64 by weighted least
squares of x P - tanh Q, re-weighted by 1 / Q of the last fit (Sanathanan-Koerner) and then by
each point's error (Lawson), towards the smallest largest error. Prints the coefficients (10
digits, as the module keeps them), the fit's error in float64, and the module's fast_tanh
against torch.tanh (float64) in float32 over [-20, 20].

    python bench/tanh_fit.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamer.compiled import TANH_CLAMP, fast_tanh  # noqa: E402

X_MAX, P_DEGREE, Q_DEGREE = 9.0, 6, 3


def fit() -> tuple[np.ndarray, np.ndarray, float]:
    """(P, Q coefficients in powers of x^2 from the constant up, largest float64 error)."""
    x = np.linspace(0.0, X_MAX, 20001)
    u = (x / X_MAX) ** 2  # in [0, 1]: well-conditioned powers
    f = np.tanh(x)
    p_basis = x[:, None] * u[:, None] ** np.arange(P_DEGREE + 1)
    q_basis = u[:, None] ** np.arange(Q_DEGREE + 1)
    weight, q_last = np.ones_like(x), np.ones_like(x)
    best = (np.inf, None, None)
    for round_ in range(400):
        a = np.concatenate([p_basis, -f[:, None] * q_basis[:, 1:]], axis=1)
        scale = np.sqrt(weight) / q_last
        solution, *_ = np.linalg.lstsq(a * scale[:, None], f * scale, rcond=None)
        p, q = solution[: P_DEGREE + 1], np.concatenate([[1.0], solution[P_DEGREE + 1 :]])
        q_values = q_basis @ q
        error = p_basis @ p / q_values - f
        worst = float(np.abs(error).max())
        if q_values.min() > 0 and worst < best[0]:
            best = (worst, p.copy(), q.copy())
        q_last = q_values
        if round_ >= 20:  # Lawson: weight grows where the error is large
            weight = weight * (np.abs(error) + 1e-300)
            weight /= weight.mean()
    worst, p, q = best
    # back from u = x^2 / X_MAX^2 to x^2
    return p / X_MAX ** (2 * np.arange(P_DEGREE + 1)), q / X_MAX ** (2 * np.arange(Q_DEGREE + 1)), worst


def main() -> None:
    p, q, worst = fit()
    print(json.dumps({"tanh_p": [float(f"{c:.10e}") for c in p], "tanh_q": [float(f"{c:.10e}") for c in q],
                      "fit_error_float64": worst}))
    x = torch.linspace(-20.0, 20.0, 4_000_001)
    got = fast_tanh(x)
    print(json.dumps({"fast_tanh_error_float32": float((got.double() - torch.tanh(x.double())).abs().max()),
                      "largest_magnitude": float(got.abs().max()), "clamp": TANH_CLAMP}))


if __name__ == "__main__":
    main()
