"""Time `quantize_params` on a full-size pi0 / pi0.5 with random bf16 weights (the packing target).

Usage: PYTHONPATH=. python scripts/bench_pack.py [--model pi0] [--size full] [--preset recommended]
       [--all-linears] [--abstract]

Random weights and synthetic stats (duquant_jax.lab.synthetic_stats): this measures the packer's cost,
not accuracy. `--all-linears` quantizes every Gemma linear of both experts (126 + 126) with the
preset's first rule.

`--abstract` packs nothing: it runs `quantize_params` under `jax.eval_shape` on bf16 param shapes,
which gives the exact shapes and dtypes of the packed tree (codes, scales, zero points, transforms,
packed embedding) without allocating or computing them, and prints the bytes of the whole param tree,
bf16 vs packed (seconds and little memory at full size, where a real pack of 252 linears needs
~22 GB). It also checks every rule's block / group constraints at that size.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from duquant_jax.layouts import linear_layouts
from duquant_jax.models import get_policy
from duquant_jax.openpi_paths import EXPERTS, pattern
from duquant_jax.packed import tree_nbytes
from duquant_jax.quantize import quantize_params, summarize
from duquant_jax.lab.synthetic_stats import synthetic_stats

# Every Gemma linear of both experts.
ALL_GEMMA = pattern(("q", "kv", "attn_vec", "gating", "linear"), EXPERTS)


def random_params(policy, seed=0, dtype=jnp.bfloat16):
  """Random bf16 params of the policy's shapes: Gemma linears ~N(0, 1/fan_in), the rest zeros/ones."""
  shapes = policy.param_shapes()
  layouts = linear_layouts(shapes)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  from duquant_jax.treepath import path_str
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
  """The preset (or `deploy_candidates` key), or its first rule applied to every Gemma linear of
  both experts."""
  from deploy_candidates import resolve
  cfg = resolve(preset)
  if all_linears:
    cfg = dataclasses.replace(cfg, rules=(dataclasses.replace(cfg.rules[0], pattern=ALL_GEMMA),))
  return cfg


def speed_only(cfg):
  """`cfg` without the weight clip search and with round-to-nearest in place of GPTQ: the same
  program and bytes, other codes, packed in a fraction of the time (the speed scripts'
  `--no-clip-search`)."""
  return dataclasses.replace(cfg, rules=tuple(
      dataclasses.replace(r, clip_search=False, rounding="nearest") for r in cfg.rules))


def bf16_shapes(policy):
  """The policy's params as bf16 shape structs (nothing allocated)."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), policy.param_shapes())


def abstract_pack(shapes, cfg):
  """The packed tree's shape structs, by jax.eval_shape of `quantize_params` on synthetic stats
  of the param shapes `shapes`: nothing allocated, nothing packed."""
  return jax.eval_shape(lambda p: quantize_params(p, cfg, synthetic_stats(p)), shapes)


def abstract_summary(policy, cfg):
  """(summarize(), device bytes) of the packed tree of bf16 params, by jax.eval_shape (nothing
  allocated). Device bytes count every leaf in its real dtype (int4 as half a byte)."""
  shapes = bf16_shapes(policy)
  packed = abstract_pack(shapes, cfg)
  return summarize(packed), tree_nbytes(packed), tree_nbytes(shapes)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="pi0")
  ap.add_argument("--size", default="full")
  ap.add_argument("--preset", default="recommended")
  ap.add_argument("--all-linears", action="store_true")
  ap.add_argument("--abstract", action="store_true",
                  help="bytes of the whole tree from jax.eval_shape; no packing")
  args = ap.parse_args()
  policy = get_policy(args.model, args.size)
  cfg = bench_config(args.preset, args.all_linears)
  if args.abstract:
    t = time.perf_counter()
    s, device_bytes, bf16_bytes = abstract_summary(policy, cfg)
    gib = lambda b: f"{b / 2**30:.3f} GiB ({b} B)"
    print(f"{args.model} {args.size} preset={cfg.name} (jax.eval_shape, {time.perf_counter() - t:.0f} s)")
    print(f"quantized tensors: {len(s.bits)} ({s.layers_quantized} linears); packed "
          f"{gib(s.weight_bytes_packed)} vs bf16 {gib(s.weight_bytes_fp)} "
          f"({s.weight_bytes_packed / s.weight_bytes_fp:.3f}x)")
    print(f"all weights: packed {gib(s.tree_bytes_packed)} vs bf16 {gib(s.tree_bytes_bf16)} "
          f"({s.tree_ratio:.3f}x, float leaves counted as bf16)")
    print(f"all weights as stored on the device (real dtypes): packed {gib(device_bytes)} vs bf16 "
          f"{gib(bf16_bytes)} ({device_bytes / bf16_bytes:.3f}x)")
    return
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
