"""The `duquant-jax` command line: maps flags to library calls; no logic of its own."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="DuQuant W4A8 quantization of openpi pi0 / pi0.5 policies in JAX.")


@app.callback()
def _root() -> None:
  """DuQuant W4A8 quantization of openpi pi0 / pi0.5 policies in JAX."""


def fail(message: str, code: int = 2) -> None:
  """Prints one clear error line and exits non-zero."""
  typer.echo(f"error: {message}", err=True)
  raise typer.Exit(code)


@app.command()
def layout(model: str = typer.Option("pi0", help="pi0 or pi05"),
           size: str = typer.Option("full", help="full, dummy or demo"),
           as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")):
  """Every param path of the model with shape and dtype (jax.eval_shape: nothing is allocated)."""
  from duquant_jax.models import get_config, Policy
  from duquant_jax.treepath import describe
  try:
    policy = Policy(get_config(model, size))
  except ValueError as e:
    fail(str(e))
  rows = describe(policy.param_shapes())
  if as_json:
    typer.echo(json.dumps([{"path": p, "shape": list(s), "dtype": d} for p, s, d in rows], indent=1))
    return
  total = 0
  for p, s, d in rows:
    n = 1
    for v in s:
      n *= v
    total += n
    typer.echo(f"{p}  {s}  {d}")
  typer.echo(f"# {len(rows)} arrays, {total:,} parameters ({model}, {size})")


from duquant_jax.cli_checkpoint import register as _register_checkpoint  # noqa: E402
_register_checkpoint(app)
from duquant_jax.cli_eval import register as _register_eval  # noqa: E402
_register_eval(app)
from duquant_jax.cli_serve import register as _register_serve  # noqa: E402
_register_serve(app)


@app.command()
def demo(model: str = typer.Option("pi0", help="pi0 or pi05"),
         preset: str = typer.Option("recommended", help="a preset name (see `presets`)"),
         calib_batches: Optional[int] = typer.Option(None, help="default: the preset's"),
         json_path: Optional[str] = typer.Option(None, "--json", help="also write the numbers here"),
         quiet: bool = typer.Option(False, help="no progress bar")):
  """Quantize the built-in demo model and compare it with the FP policy (the main job)."""
  from duquant_jax.config import get_preset
  from duquant_jax.demo import format_result, run_demo
  import dataclasses
  try:
    cfg = get_preset(preset)
    if model not in ("pi0", "pi05"):
      raise ValueError(f"unknown model {model!r}; expected pi0 or pi05")
  except ValueError as e:
    fail(str(e))
  result = run_demo(model, cfg, calib_batches=calib_batches, progress=not quiet)
  typer.echo(result.rule_report)
  typer.echo(format_result(result))
  if json_path:
    with open(json_path, "w") as f:
      json.dump({k: v for k, v in dataclasses.asdict(result).items() if k != "rule_report"}, f,
                indent=1)


@app.command()
def presets():
  """List the presets and their rules."""
  from duquant_jax.config import PRESETS
  for name, cfg in PRESETS.items():
    rotated = ", residual streams and values rotated" if cfg.rotate_residual else ""
    typer.echo(f"{name}  (calibration batches {cfg.calib_batches}{rotated})")
    for r in cfg.rules:
      below = f" (A16 below {r.act_min_tokens} tokens)" if r.act_min_tokens else ""
      if r.act_bits is not None and r.act_scale == "static":
        below += f" (static act scale, p{r.act_percentile:g})"
      typer.echo(f"    {r.pattern}  W{r.weight_bits}A{r.act_bits or 16}{below} block {r.block_size} "
                 f"rot {r.rotation} perm {r.permutation} smooth {r.smooth_alpha} "
                 f"{r.weight_granularity} {'sym' if r.weight_symmetric else 'asym'} "
                 f"clip {'search' if r.clip_search else 'off'} out-rot {r.output_rotation}")
    for e in cfg.embeddings:
      group = "per row" if e.group_size is None else f"group {e.group_size}"
      typer.echo(f"    {e.pattern}  embedding W{e.bits} weight-only, {group}, "
                 f"{'sym' if e.symmetric else 'asym'}, {e.scale_dtype} scales")


BENCHMARKS = {"kernels": "bench_kernels.py", "transform": "bench_transform.py",
              "policy": "bench_policy.py", "pack": "bench_pack.py", "profile": "profile_policy.py",
              "mosaic": "probe_mosaic_gpu.py", "mosaic-w4a8": "probe_mosaic_w4a8.py"}


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context,
          which: str = typer.Argument(..., help=f"one of: {', '.join(BENCHMARKS)}")):
  """Run a benchmark script of the repository's scripts/ folder; further arguments pass through.

  kernels, transform, policy and profile want a GPU (BENCHMARKS.md has the H100 numbers and
  commands); `duquant-jax bench kernels --help` shows a script's own flags.
  """
  import runpy
  from pathlib import Path
  if which not in BENCHMARKS:
    fail(f"unknown benchmark {which!r}; choose one of {', '.join(BENCHMARKS)}")
  scripts = Path(__file__).resolve().parents[1] / "scripts"
  script = scripts / BENCHMARKS[which]
  if not script.is_file():
    fail(f"{script} not found: the benchmarks run from a source checkout (pip install -e .)")
  argv, path = sys.argv, list(sys.path)
  sys.argv = [str(script), *ctx.args]
  sys.path.insert(0, str(scripts))
  try:
    runpy.run_path(str(script), run_name="__main__")
  finally:
    sys.argv, sys.path[:] = argv, path


def main(argv: Optional[list[str]] = None) -> None:
  app(args=argv, prog_name="duquant-jax")


if __name__ == "__main__":
  main(sys.argv[1:])
