"""What the library knows, printed: `layout` (a model's param paths) and `presets` (their rules)."""

from __future__ import annotations

import json

import typer

from duquant_jax.cli.errors import fail
from duquant_jax.config import PRESETS
from duquant_jax.models import Policy, get_config
from duquant_jax.treepath import describe


def layout(model: str = typer.Option("pi0", help="pi0 or pi05"),
           size: str = typer.Option("full", help="full, dummy or demo"),
           as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")):
  """Every param path of the model with shape and dtype (jax.eval_shape: nothing is allocated)."""
  try:
    policy = Policy(get_config(model, size))
  except ValueError as e:
    fail(str(e))
  rows = describe(policy.param_shapes())
  if as_json:
    typer.echo(json.dumps([{"path": p, "shape": list(s), "dtype": d} for p, s, d in rows],
                          indent=1))
    return
  total = 0
  for p, s, d in rows:
    n = 1
    for v in s:
      n *= v
    total += n
    typer.echo(f"{p}  {s}  {d}")
  typer.echo(f"# {len(rows)} arrays, {total:,} parameters ({model}, {size})")


def presets():
  """List the presets and their rules."""
  for name, cfg in PRESETS.items():
    rotated = ", residual streams and values rotated" if cfg.rotate_residual else ""
    typer.echo(f"{name}  (calibration batches {cfg.calib_batches}{rotated})")
    for r in cfg.rules:
      below = f" (A16 below {r.act_min_tokens} tokens)" if r.act_min_tokens else ""
      if r.act_bits is not None and r.act_scale == "static":
        below += f" (static act scale, p{r.act_percentile:g})"
      typer.echo(f"    {r.pattern}  W{r.weight_bits}A{r.act_bits or 16}{below} "
                 f"block {r.block_size} "
                 f"rot {r.rotation} perm {r.permutation} smooth {r.smooth_alpha} "
                 f"{r.weight_granularity} {'sym' if r.weight_symmetric else 'asym'} "
                 f"clip {'search' if r.clip_search else 'off'} out-rot {r.output_rotation}")
    for e in cfg.embeddings:
      group = "per row" if e.group_size is None else f"group {e.group_size}"
      typer.echo(f"    {e.pattern}  embedding W{e.bits} weight-only, {group}, "
                 f"{'sym' if e.symmetric else 'asym'}, {e.scale_dtype} scales")
