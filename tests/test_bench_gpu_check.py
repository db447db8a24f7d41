"""bench/gpu_check.py is run only where a GPU is lent, rarely: its --dry-run (every figure's code
on the CPU, the kernel interpreted, B=256) keeps it from rotting between such runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import streamer.kernels

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_prints_every_figure():
    if streamer.kernels.triton is None:
        pytest.skip("no Triton in this torch build")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--quick"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    names = {f["figure"] for f in figures}
    assert {"gpu_fused_step", "gpu_torch_step", "gpu_nn_lstm_seq1_step", "gpu_offline_cudnn", "gpu_engine_step",
            "gpu_execute_profile", "gpu_engine_small_batch", "gpu_inline_equivalence"} <= names, names
    assert not [f for f in figures if "error" in f], figures
    assert all(f["ok"] for f in figures if f["figure"] == "gpu_inline_equivalence")
    small = [f for f in figures if f["figure"] == "gpu_engine_small_batch"]
    assert all(f["max_abs_difference"]["forecast"] == 0.0 and not any(f["nonfinite"].values()) for f in small)
