"""Engine device-steps/s of this tree against another commit's, in the same run.

    python bench/engine_vs.py [BASE_REF]   (default: the commit before the anomaly likelihood)

Checks BASE_REF out into a temporary git worktree and times `Engine.step` over B devices (one
reading each, ids fresh strings at every step; H=64, L=2, 1 value, CPU) in both trees,
alternating base and head ROUNDS times in fresh processes, so that machine noise hits both
alike. Prints one JSON line per batch size with the best of each tree's rounds (noise on a
shared machine only slows a round down) and their ratio (head / base). ENGINE_VS_STATE_DTYPE=bfloat16 times bfloat16 state instead.
ENGINE_VS_READINGS_PER_DEVICE=R (default 1) gives each device R readings in a batch (B / R
devices, their readings interleaved as batch messages from several gateways bring them): the
step then plans R waves. ENGINE_VS_COMPILE=1 times the engine with model.compile (both trees
must have it), ENGINE_VS_THREADS=N on N torch threads (default 1). Each process keeps freed
memory as `streamer run` does (ENGINE_VS_MALLOC_KEEP_MB, default 256 as run.malloc_keep_mb; 0:
glibc's defaults; a tree without streamer.malloc keeps glibc's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BASE_REF = "de7d5ac"  # the last commit with the residual z-score
ROUNDS = 5
STATE_DTYPE = os.environ.get("ENGINE_VS_STATE_DTYPE", "float32")  # or bfloat16 (a tree that has it)
PER_DEVICE = os.environ.get("ENGINE_VS_READINGS_PER_DEVICE", "1")
COMPILE = os.environ.get("ENGINE_VS_COMPILE", "0")
THREADS = os.environ.get("ENGINE_VS_THREADS", "1")
KEEP_MB = os.environ.get("ENGINE_VS_MALLOC_KEEP_MB", "256")
SNIPPET = r"""
import json, sys, time
import numpy as np, torch
try:
    from streamer.malloc import retain_freed_memory
    retain_freed_memory(int(sys.argv[5]))
except ImportError:  # a tree from before it
    pass
from streamer.engine import Engine, ReadingBatch
from streamer.model import ModelBundle, ModelConfig, init_random_model
torch.set_num_threads(int(sys.argv[4]))
config = ModelConfig(1, 64, 2, 1)
bundle = ModelBundle(init_random_model(config, 0), config, "bench", None)
out = {}
for batch in (1024, 16384):
    extra = {"state_dtype": torch.bfloat16} if sys.argv[1] == "bfloat16" else {}
    if sys.argv[3] == "1":
        extra["compile"] = True
    engine = Engine.build(bundle, capacity=batch, device="cpu", **extra)
    values = np.random.default_rng(0).normal(size=(batch, 1)).astype(np.float32)
    # Fresh id strings at every step, as decoding messages makes them (no hash cached in them).
    per = int(sys.argv[2])
    fresh = lambda: ReadingBatch([f"d{i % (batch // per)}" for i in range(batch)], np.zeros(batch), values)
    engine.step(fresh(), now=0.0)
    runs = []
    t_end = time.perf_counter() + 2.0
    while time.perf_counter() < t_end or len(runs) < 3:
        readings = fresh()
        t0 = time.perf_counter(); engine.step(readings, now=0.0); runs.append(time.perf_counter() - t0)
    out[batch] = batch / float(np.median(runs))
print(json.dumps(out))
"""


def run(tree: Path) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", SNIPPET, STATE_DTYPE, PER_DEVICE, COMPILE, THREADS, KEEP_MB], cwd=tree, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    base_ref = sys.argv[1] if len(sys.argv) > 1 else BASE_REF
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), base_ref], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            results: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
            for _ in range(ROUNDS):
                results["base"].append(run(base))
                results["head"].append(run(ROOT))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    for batch in results["head"][0]:
        b = max(r[batch] for r in results["base"])
        h = max(r[batch] for r in results["head"])
        print(json.dumps({"figure": "engine_step_vs_base", "base": base_ref, "state_dtype": STATE_DTYPE, "batch": int(batch),
                          "readings_per_device": int(PER_DEVICE),
                          "compiled": COMPILE == "1", "torch_threads": int(THREADS), "malloc_keep_mb": int(KEEP_MB),
                          "base_device_steps_per_s": round(b), "head_device_steps_per_s": round(h),
                          "ratio": round(h / b, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
