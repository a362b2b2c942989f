"""Evaluation commands of the `duquant-jax` CLI: eval (fidelity vs FP) and diagnose (head structure).

Registered on the main typer app by `register(app)` (called in cli.py). Flags map to
`duquant_jax.evaluate` and `duquant_jax.diagnose`; expected failures are one `error: ...` line on
stderr with exit code 2.
"""

from __future__ import annotations

import pathlib
from typing import Optional

import typer


def _fail(message: str) -> None:
  from duquant_jax.cli.app import fail
  fail(message)


def register(app: typer.Typer) -> None:
  """Adds `eval` and `diagnose` to `app`."""

  @app.command("eval")
  def eval_cmd(
      model: str = typer.Option("pi0", help="pi0 or pi05"),
      size: str = typer.Option("demo", help="model size (demo runs in minutes on a CPU)"),
      presets: str = typer.Option("recommended", help="comma-separated variants: "
                                  "<preset>[+key=value]...[@c<N>], e.g. recommended+rot=weight_svd,"
                                  "recommended+alpha=none,recommended@c128"),
      json_path: Optional[str] = typer.Option(None, "--json", help="write the full report here"),
      plot: Optional[str] = typer.Option(None, help="write the drift plot (PNG) here"),
      markdown: Optional[str] = typer.Option(None, help="also write the markdown tables here"),
      calib_batches: int = typer.Option(16, help="calibration batches for variants without @cN "
                                        "(0: each preset's own)"),
      episodes: int = typer.Option(4, help="closed-loop episodes"),
      chunks: int = typer.Option(10, help="chunks per episode (drift horizons 1,5,10,25,50 up to this)"),
      tolerance: float = typer.Option(0.1, help="state divergence counted as drifted (L2)"),
      seed: int = typer.Option(0),
      quiet: bool = typer.Option(False, help="no progress lines")):
    """Measure presets and variants against the FP policy: action error, drift, per-layer error."""
    from duquant_jax.lab import evaluate as ev
    if model not in ("pi0", "pi05"):
      _fail(f"unknown model {model!r}; expected pi0 or pi05")
    try:
      variants = [ev.parse_variant(s) for s in presets.split(",") if s.strip()]
      if not variants:
        raise ValueError("--presets names no variant")
      cfg = ev.EvalConfig(episodes=episodes, chunks=chunks, calib_batches=calib_batches,
                          tolerance=tolerance, seed=seed)
      report = ev.evaluate(model, variants, cfg, size=size,
                           log=(lambda s: None) if quiet else (lambda s: typer.echo(s, err=True)))
    except ValueError as e:
      _fail(str(e))
    text = ev.format_markdown(report)
    typer.echo(text)
    if markdown:
      pathlib.Path(markdown).write_text(text + "\n")
    if json_path:
      pathlib.Path(json_path).write_text(report.to_json())
    if plot:
      ev.plot_drift(report, plot)

  @app.command()
  def diagnose(
      model: str = typer.Option("pi0", help="pi0 or pi05"),
      size: str = typer.Option("demo", help="model size"),
      out: str = typer.Option("diagnose_out", help="folder for the heat maps and summary"),
      calib_batches: int = typer.Option(8, help="calibration batches (activation samples for the "
                                        "greedy rotation and the attention-logit error)"),
      seed: int = typer.Option(0)):
    """Per-head structure of the attention projections and what quantization does to it."""
    from duquant_jax.lab import diagnose as dg
    if model not in ("pi0", "pi05"):
      _fail(f"unknown model {model!r}; expected pi0 or pi05")
    try:
      summary = dg.run_diagnose(model, size=size, out=out, calib_batches=calib_batches, seed=seed,
                                log=lambda s: typer.echo(s, err=True))
    except ValueError as e:
      _fail(str(e))
    typer.echo(summary)
