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


def test_gpu_check_fails_the_run_when_a_check_fails(monkeypatch, capsys):
    # It had printed "ok": false or a failing pytest rc and exited 0: make bench-gpu passed.
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", REPO / "bench" / "gpu_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--quick"])
    monkeypatch.setattr(check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(check.torch.cuda, "get_device_properties",
                        lambda _: types.SimpleNamespace(name="fake", total_memory=2**30, major=9, minor=0))
    for name in ("bench_engine", "bench_steps"):
        monkeypatch.setattr(check, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(check, "fused_size_limit", lambda: True)
    failed = types.SimpleNamespace(returncode=1, stdout="1 failed, 20 passed", stderr="")
    monkeypatch.setattr(check.subprocess, "run", lambda *args, **kwargs: failed)
    monkeypatch.setattr(check, "inline_checks", lambda: True)
    assert check.main() == 1  # pytest failed: the inline checks passing do not make it a pass
    monkeypatch.setattr(check.subprocess, "run", lambda *args, **kwargs: types.SimpleNamespace(
        returncode=0, stdout="21 passed", stderr=""))
    assert check.main() == 0
    monkeypatch.setattr(check, "fused_size_limit", lambda: False)
    assert check.main() == 1
    capsys.readouterr()
