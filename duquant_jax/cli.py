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
  from duquant_jax.models.layout_table import describe
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


def main(argv: Optional[list[str]] = None) -> None:
  app(args=argv, prog_name="duquant-jax")


if __name__ == "__main__":
  main(sys.argv[1:])
