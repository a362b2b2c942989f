"""Weight-only (W8A16 / W4A16) matmul: zero points folded into the GEMM's weight operand against
subtracted as zw * rowsum(x) after the dot (`xla.weight_only_matmul(..., fold_zero=True / False)`;
by default it picks by code type and M, `WEIGHT_ONLY_FOLD_MIN_TOKENS`, from this probe), and bf16
`jnp.dot`, the same arithmetic as one 2-D dot with an elementwise epilogue (`2-D`) and with
q - zw copied to a dense bf16 weight first (`2-D copied`), and the Pallas weight-only kernel (`pallas_gpu.weight_only_matmul`: one kernel, zero
points folded in registers; `--kernel`), timed side by side in one jitted loop per case
(bench_kernels' LoopTimer), with their largest differences from the subtract-after form.

Usage (GPU): cd scripts && PYTHONPATH=.. python3 probe_weight_only.py [--ms 51,768]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench_kernels import LoopTimer, n_copies
from duquant_jax.kernels import pallas_gpu, xla

# (name, K, N, code dtype): pi0's expert attention (q + kv fused as N = 2560, o) and SigLIP's.
SHAPES = [("300m q+kv", 1024, 2560, jnp.int8), ("300m o", 2048, 1024, jnp.int8),
          ("siglip q", 1152, 1152, jnp.int8), ("siglip fc1 w4", 1152, 4304, jnp.int4),
          ("300m gate/up w4", 1024, 8192, jnp.int4), ("300m down w4", 4096, 1024, jnp.int4)]


def folded(x, q, sw, zw):
  return xla.weight_only_matmul(x, q, sw, zw, fold_zero=True)


def subtract_after(x, q, sw, zw):
  return xla.weight_only_matmul(x, q, sw, zw, fold_zero=False)


def plain_2d(x, q, sw, zw):
  """One scale group as a 2-D dot with an elementwise epilogue (the W4A8 XLA path's form), zero
  points subtracted after the dot."""
  y = jax.lax.dot_general(x, q.astype(x.dtype), (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32)
  y = y - zw.T * jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True)
  return y * sw.T


def copied_2d(x, q, sw, zw):
  """The same with q - zw (exact in bf16) made as a copy first, behind an optimization barrier,
  so that the GEMM library's bf16 kernel reads a dense bf16 weight."""
  w = jax.lax.optimization_barrier((q.astype(jnp.float32) - zw).astype(x.dtype))
  y = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return y * sw.T


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--ms", default="51,768")
  ap.add_argument("--kernel", action="store_true", help="also time the Pallas weight-only kernel")
  ap.add_argument("--shapes", default=None, help="comma list of SHAPES names (default: all)")
  args = ap.parse_args()
  shapes = SHAPES if args.shapes is None else [s for s in SHAPES if s[0] in args.shapes.split(",")]
  print(f"device={jax.devices()[0].device_kind} jax={jax.__version__}")
  print("| linear | M | K x N | bf16 dot us | folded us | subtract after us | max rel diff | "
        "2-D us | 2-D copied us | 2-D rel diff | kernel us | kernel rel diff |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name, k, n, dt in shapes:
    for m in (int(v) for v in args.ms.split(",")):
      keys = jax.random.split(jax.random.key(0), 4)
      x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
      lo, hi = (-8, 8) if dt == jnp.int4 else (-128, 128)
      copies = n_copies(n * k * (0.5 if dt == jnp.int4 else 1))
      ws = [(jax.random.randint(jax.random.fold_in(keys[1], i), (n, k), lo, hi).astype(dt),
             0.01 + 0.01 * jax.random.uniform(keys[2], (n, 1)),
             jnp.round(jax.random.uniform(keys[3], (n, 1)) * 10 - 5)) for i in range(copies)]
      wb = [jax.random.normal(jax.random.fold_in(keys[1], i), (k, n), jnp.bfloat16) for i in range(copies)]
      y0 = jnp.zeros((m, n), jnp.float32)
      t = {}
      t["bf16"] = LoopTimer(lambda c, w: jnp.dot(c[0], w, preferred_element_type=jnp.float32),
                            (x,), wb, y0, 50).time()
      t["folded"] = LoopTimer(lambda c, w: folded(c[0], *w), (x,), ws, y0, 50).time()
      t["after"] = LoopTimer(lambda c, w: subtract_after(c[0], *w), (x,), ws, y0, 50).time()
      t["2d"] = LoopTimer(lambda c, w: plain_2d(c[0], *w), (x,), ws, y0, 50).time()
      t["2d_copied"] = LoopTimer(lambda c, w: copied_2d(c[0], *w), (x,), ws, y0, 50).time()
      a, b = folded(x, *ws[0]), subtract_after(x, *ws[0])
      rel = lambda y: float(jnp.max(jnp.abs(y - b)) / jnp.max(jnp.abs(b)))
      rel_2d = max(rel(plain_2d(x, *ws[0])), rel(copied_2d(x, *ws[0])))
      kern = ""
      if args.kernel:
        t["kernel"] = LoopTimer(lambda c, w: pallas_gpu.weight_only_matmul(c[0], *w), (x,), ws, y0,
                                50).time()
        kern = f" {t['kernel'] * 1e6:.1f} | {rel(pallas_gpu.weight_only_matmul(x, *ws[0])):.1e} |"
      print(f"| {name} | {m} | {k}x{n} | {t['bf16'] * 1e6:.1f} | {t['folded'] * 1e6:.1f} | "
            f"{t['after'] * 1e6:.1f} | {rel(a):.1e} | {t['2d'] * 1e6:.1f} | "
            f"{t['2d_copied'] * 1e6:.1f} | {rel_2d:.1e} |{kern or ' | |'}", flush=True)


if __name__ == "__main__":
  main()
