"""Packing-time cost of GPTQ rounding on one full-size layer, against the nearest-rounding packer.

Usage: PYTHONPATH=. python scripts/bench_gptq.py [--shapes gate,down,expert_down] [--repeats 1]

Times, per weight of one stacked layer (random weights, a random block-16 DuQuant transform, a
Hessian from random correlated rows), `pack_layers` with `rounding="nearest"` and with
`rounding="gptq"` (clip search on in both): the difference is GPTQ's cost (the Hessian's transform
to the quantized basis, the inverse Cholesky factors, the column loop). Multiply by the layer count
(18 per expert) for a whole model. Compile time is excluded (one warm-up call).
"""
import argparse
import time

import jax
import jax.numpy as jnp

from duquant_jax.config import LayerRule
from duquant_jax.layouts import LinearLayout
from duquant_jax.quantize import pack_layers
from duquant_jax.transforms import build_duquant_transform

# name -> (K, N) of one layer's weight, from the gemma_2b / gemma_300m layouts.
SHAPES = {
    "gate": (2048, 16384 * 2),  # gemma_2b gate/up: K = 2048, N = 2 x 16384
    "down": (16384, 2048),  # gemma_2b down: K = 16384 (Hessian blocks of 2048)
    "expert_down": (4096, 1024),  # gemma_300m down
    "q": (2048, 2048),
}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default="q,gate,down")
  ap.add_argument("--hessian-block", type=int, default=2048)
  ap.add_argument("--rows", type=int, default=4096)
  args = ap.parse_args()
  for name in args.shapes.split(","):
    k, n = SHAPES[name]
    key = jax.random.key(0)
    w = jax.random.normal(key, (1, k, n), jnp.float32) / k ** 0.5
    x = jax.random.normal(jax.random.fold_in(key, 1), (args.rows, k), jnp.float32)
    x = x.at[:, :8].multiply(30.0)
    hb = min(k, args.hessian_block)
    xb = x.reshape(args.rows, k // hb, hb)
    h = jnp.einsum("rbi,rbj->bij", xb, xb)[None]
    samples = x[None, :64]
    t = build_duquant_transform(samples, jnp.max(jnp.abs(x), 0)[None], jnp.max(jnp.abs(w), -1),
                                block_size=16, key=key, alpha=0.5, rotation="random",
                                permutation="zigzag", head_dim=None, w=None, max_steps=0)
    lay = LinearLayout(path="bench", shape=(1, k, n), eqn="BTD,DF->BTF", norm=None, norm_kind=None,
                       head_role=None, head_dim=None)
    for rounding in ("nearest", "gptq"):
      rule = LayerRule(pattern=".*", block_size=16, rounding=rounding)
      run = lambda: jax.block_until_ready(pack_layers(
          w, t, None, samples, h if rounding == "gptq" else None, layout=lay, rule=rule, rows=1,
          cols=k))
      t0 = time.perf_counter()
      run()
      t1 = time.perf_counter()
      run()
      t2 = time.perf_counter()
      print(f"{name} K={k} N={n}: {rounding:8s} first call {t1 - t0:6.1f} s, warm {t2 - t1:6.1f} s",
            flush=True)


if __name__ == "__main__":
  main()
