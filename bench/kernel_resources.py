#!/usr/bin/env python3
"""The fused CUDA kernel's shared memory a block, compiled ahead of time for a GPU target: no
GPU needed. One JSON object per shape.

    python bench/kernel_resources.py [--arch 90] [--limit 232448] DTYPE,HIDDEN,INPUT,LAYERS,OUTPUT ...

DTYPE is float32 or bfloat16 (the state's). The kernel keeps a gate's weight blocks (padded to
powers of two) in shared memory; where they exceed the GPU's limit a block (--limit; an H100 or
H200 takes 232,448 bytes, an A100 166,912) Triton refuses the first launch, and the engine serves
the model with the torch step instead (streamer.kernels.fused_if_it_launches). Compiling float32
state at large sizes takes minutes on a CPU of two cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from streamer import kernels  # noqa: E402


def shared_bytes(dtype: str, hidden: int, n_in: int, layers: int, n_out: int, arch: int) -> int:
    """Shared memory a block of the kernel as TritonLstmStep launches it by default."""
    st = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    signature = dict(x_ptr="*fp32", slot_ptr="*i64", hc_ptr=f"*{st}", out_ptr="*fp32", w_in0_ptr=f"*{st}",
                     w_x_ptr=f"*{st}", w_h_ptr=f"*{st}", b_ptr="*fp32", hw_ptr="*fp32", hb_ptr="*fp32",
                     n_rows="i32", hc_stride="i32")
    constants = dict(IN=n_in, INP=kernels._next_pow2(n_in), H=hidden, HP=kernels._next_pow2(hidden), L=layers,
                     F=n_out, FP=kernels._next_pow2(n_out), BLOCK_B=kernels.BLOCK_B, DOT_BF16=st == "bf16",
                     UPCAST=False, PREC="ieee" if st == "bf16" else "tf32x3",
                     FAST=st == "bf16" and kernels.FAST_MATH_BY_DEFAULT, PRELOAD=kernels.PRELOAD_BY_DEFAULT)
    signature.update({name: "constexpr" for name in constants})
    compiled = triton.compile(ASTSource(kernels._lstm_rows_kernel, signature, constants),
                              target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))
    return int(compiled.metadata.shared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="+", help="DTYPE,HIDDEN,INPUT,LAYERS,OUTPUT")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--limit", type=int, default=232448, help="the GPU's shared memory a block, bytes")
    args = parser.parse_args()
    for shape in args.shapes:
        dtype, *sizes = shape.split(",")
        hidden, n_in, layers, n_out = map(int, sizes)
        started = time.perf_counter()
        needed = shared_bytes(dtype, hidden, n_in, layers, n_out, args.arch)
        print(json.dumps({"figure": "kernel_shared_memory", "arch": args.arch, "state_dtype": dtype, "hidden": hidden,
                          "input": n_in, "layers": layers, "output": n_out, "shared_bytes": needed,
                          "limit_bytes": args.limit, "fits": needed <= args.limit,
                          "compile_s": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
