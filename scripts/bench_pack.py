"""Time `quantize_params` on a full-size pi0 / pi0.5 with random bf16 weights (the packing target).

Usage: PYTHONPATH=. python scripts/bench_pack.py [--model pi0] [--size full] [--preset recommended]
       [--all-linears]

Random weights and synthetic stats (duquant_jax.synthetic_stats): this measures the packer's cost,
not accuracy. `--all-linears` quantizes every Gemma linear of both experts (126 + 126) with the
preset's first rule.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from duquant_jax.config import get_preset
from duquant_jax.layouts import linear_layouts
from duquant_jax.models import get_policy
from duquant_jax.quantize import quantize_params, summarize
from duquant_jax.synthetic_stats import synthetic_stats

ALL_GEMMA = r"PaliGemma/llm/layers/(attn/.*_einsum(_1)?/w|mlp(_1)?/(gating_einsum|linear))"


def random_params(policy, seed=0, dtype=jnp.bfloat16):
  """Random bf16 params of the policy's shapes: Gemma linears ~N(0, 1/fan_in), the rest zeros/ones."""
  shapes = policy.param_shapes()
  layouts = linear_layouts(shapes)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  from duquant_jax.models.layout_table import path_str
  leaves = []
  for i, (p, s) in enumerate(flat):
    path = path_str(p)
    if path in layouts:
      k = jax.random.fold_in(jax.random.key(seed), i)
      std = layouts[path].in_features ** -0.5
      leaves.append((jax.random.normal(k, s.shape, jnp.float32) * std).astype(dtype))
    else:
      leaves.append(jnp.zeros(s.shape, dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def bench_config(preset: str, all_linears: bool):
  """The preset, or its first rule applied to every Gemma linear of both experts."""
  cfg = get_preset(preset)
  if all_linears:
    cfg = dataclasses.replace(cfg, rules=(dataclasses.replace(cfg.rules[0], pattern=ALL_GEMMA),))
  return cfg


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="pi0")
  ap.add_argument("--size", default="full")
  ap.add_argument("--preset", default="recommended")
  ap.add_argument("--all-linears", action="store_true")
  args = ap.parse_args()
  policy = get_policy(args.model, args.size)
  cfg = bench_config(args.preset, args.all_linears)
  t = time.perf_counter()
  params = jax.block_until_ready(random_params(policy))
  t_init = time.perf_counter() - t
  stats = jax.block_until_ready(synthetic_stats(params))
  t = time.perf_counter()
  packed = jax.block_until_ready(quantize_params(params, cfg, stats))
  t_pack = time.perf_counter() - t
  s = summarize(packed)
  print(f"{args.model} {args.size} preset={cfg.name} all_linears={args.all_linears} "
        f"backend={jax.default_backend()} jax={jax.__version__}")
  print(f"random params {t_init:.1f} s; quantize_params {t_pack:.1f} s; "
        f"{s.layers_quantized} linears; packed {s.weight_bytes_packed / 2**30:.2f} GiB vs bf16 "
        f"{s.weight_bytes_fp / 2**30:.2f} GiB ({s.weight_bytes_packed / s.weight_bytes_fp:.3f}x)")


if __name__ == "__main__":
  main()
