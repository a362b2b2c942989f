"""`duquant-jax bench NAME [ARGS]`: runs a benchmark script of the repository's scripts/ folder."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import typer

from duquant_jax.cli.errors import fail

BENCHMARKS = {"kernels": "bench_kernels.py", "transform": "bench_transform.py",
              "policy": "bench_policy.py", "pack": "bench_pack.py", "profile": "profile_policy.py",
              "mosaic": "probe_mosaic_gpu.py", "mosaic-w4a8": "probe_mosaic_w4a8.py",
              "attention": "bench_attention.py"}

# Arguments after NAME are the script's own flags: typer passes them through untouched.
CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}

# duquant_jax/cli/bench.py -> the checkout's root, which holds scripts/.
_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def bench(ctx: typer.Context,
          which: str = typer.Argument(..., help=f"one of: {', '.join(BENCHMARKS)}")):
  """Run a benchmark script of the repository's scripts/ folder; further arguments pass through.

  kernels, transform, policy and profile want a GPU (BENCHMARKS.md has the H100 numbers and
  commands); `duquant-jax bench kernels --help` shows a script's own flags.
  """
  if which not in BENCHMARKS:
    fail(f"unknown benchmark {which!r}; choose one of {', '.join(BENCHMARKS)}")
  script = _SCRIPTS / BENCHMARKS[which]
  if not script.is_file():
    fail(f"{script} not found: the benchmarks run from a source checkout (pip install -e .)")
  argv, path = sys.argv, list(sys.path)
  sys.argv = [str(script), *ctx.args]
  sys.path.insert(0, str(_SCRIPTS))
  try:
    runpy.run_path(str(script), run_name="__main__")
  finally:
    sys.argv, sys.path[:] = argv, path
