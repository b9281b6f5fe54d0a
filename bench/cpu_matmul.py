"""What this CPU's matmul units give under JAX: fp32, bf16 in/bf16 out, and bf16 in/fp32 accumulate.

    .venv/bin/python bench/cpu_matmul.py [--out FILE]

Shapes: a 2048² square matmul (the peak ``bench/train_throughput.py`` divides by) and the LoRA
step's largest projection at batch 4 × 64 tokens (256 × 640 · 640 × 2048), forward and
input-gradient form. On CPUs with AMX or AVX512-BF16, XLA runs bf16 operands with an fp32 result
much faster than fp32; Keras' mixed_bfloat16 policy asks for a bf16 result, which XLA runs at about
the fp32 rate. Writes GFLOP/s per case as JSON (default ``runs/bench/cpu_matmul.json``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbutils  # noqa: F401  (JAX backend before Keras loads)
from nbutils import files, paths


def gflops(fn, a, w, contract_w: int, seconds: float = 1.5) -> float:
    """Sustained GFLOP/s of the jitted matmul ``fn(a, w)`` (2·M·K·N per call)."""
    import jax

    flops = 2 * a.size * w.shape[1 - contract_w]
    call = jax.jit(fn)
    args = (a, w)
    jax.block_until_ready(call(*args))
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        jax.block_until_ready(call(*args))
        count += 1
    return flops * count / (time.perf_counter() - start) / 1e9


def main() -> int:
    """Time each case and print a table."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(paths.RUNS_DIR / "bench" / "cpu_matmul.json"))
    args = parser.parse_args()

    def matmul(contract_w: int, out_dtype):
        """x·W (``contract_w`` 0) or g·Wᵀ (1, the backward pass's form) with the result in
        ``out_dtype``."""
        return lambda a, w: lax.dot_general(
            a, w, (((1,), (contract_w,)), ((), ())), preferred_element_type=out_dtype
        )

    key = jax.random.PRNGKey(0)
    shapes = {
        "square 2048": ((2048, 2048), (2048, 2048), 0),
        "projection fwd 256x640x2048": ((256, 640), (640, 2048), 0),
        "projection input-grad 256x2048x640": ((256, 2048), (640, 2048), 1),
    }
    results: dict[str, dict[str, float]] = {}
    for name, (a_shape, b_shape, contract_w) in shapes.items():
        results[name] = {}
        for label, operands, out_dtype in (
            ("fp32", jnp.float32, jnp.float32),
            ("bf16 -> bf16", jnp.bfloat16, jnp.bfloat16),
            ("bf16 -> fp32", jnp.bfloat16, jnp.float32),
        ):
            a = jax.random.normal(key, a_shape).astype(operands)
            b = jax.random.normal(key, b_shape).astype(operands)
            results[name][label] = round(gflops(matmul(contract_w, out_dtype), a, b, contract_w), 1)
    print("| GFLOP/s | " + " | ".join(results["square 2048"]) + " |")
    print("|---|" + "---:|" * 3)
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{v:.0f}" for v in row.values()) + " |")
    files.write_json(Path(args.out), {"backend": jax.default_backend(), "gflops": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
