"""Research-harness commands of the `duquant-jax` CLI: demo (the main job on the demo model), eval
(fidelity vs FP) and diagnose (head structure).

Flags map to `duquant_jax.lab.demo`, `duquant_jax.lab.evaluate` and `duquant_jax.lab.diagnose`;
expected failures are one `error: ...` line on stderr with exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Optional

import typer

from duquant_jax.cli.errors import fail
from duquant_jax.config import get_preset
from duquant_jax.lab import diagnose as dg
from duquant_jax.lab import evaluate as ev
from duquant_jax.lab.demo import format_result, run_demo
from duquant_jax.lab.plots import pyplot


def _require_plots() -> None:
  """One error line before the work starts, not a traceback after it, without matplotlib."""
  try:
    pyplot()
  except ImportError as e:
    fail(str(e))


def demo(model: str = typer.Option("pi0", help="pi0 or pi05"),
         preset: str = typer.Option("recommended", help="a preset name (see `presets`)"),
         calib_batches: Optional[int] = typer.Option(None, help="default: the preset's"),
         json_path: Optional[str] = typer.Option(None, "--json",
                                                 help="also write the numbers here"),
         quiet: bool = typer.Option(False, help="no progress bar")):
  """Quantize the built-in demo model and compare it with the FP policy (the main job)."""
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
    chunks: int = typer.Option(
        10, help="chunks per episode (drift horizons 1,5,10,25,50 up to this)"),
    tolerance: float = typer.Option(0.1, help="state divergence counted as drifted (L2)"),
    seed: int = typer.Option(0),
    quiet: bool = typer.Option(False, help="no progress lines")):
  """Measure presets and variants against the FP policy: action error, drift, per-layer error."""
  if model not in ("pi0", "pi05"):
    fail(f"unknown model {model!r}; expected pi0 or pi05")
  if plot:
    _require_plots()
  try:
    variants = [ev.parse_variant(s) for s in presets.split(",") if s.strip()]
    if not variants:
      raise ValueError("--presets names no variant")
    cfg = ev.EvalConfig(episodes=episodes, chunks=chunks, calib_batches=calib_batches,
                        tolerance=tolerance, seed=seed)
    report = ev.evaluate(model, variants, cfg, size=size,
                         log=(lambda s: None) if quiet else (lambda s: typer.echo(s, err=True)))
  except ValueError as e:
    fail(str(e))
  text = ev.format_markdown(report)
  typer.echo(text)
  if markdown:
    pathlib.Path(markdown).write_text(text + "\n")
  if json_path:
    pathlib.Path(json_path).write_text(report.to_json())
  if plot:
    ev.plot_drift(report, plot)


def diagnose(
    model: str = typer.Option("pi0", help="pi0 or pi05"),
    size: str = typer.Option("demo", help="model size"),
    out: str = typer.Option("diagnose_out", help="folder for the heat maps and summary"),
    calib_batches: int = typer.Option(8, help="calibration batches (activation samples for the "
                                      "greedy rotation and the attention-logit error)"),
    seed: int = typer.Option(0)):
  """Per-head structure of the attention projections and what quantization does to it."""
  if model not in ("pi0", "pi05"):
    fail(f"unknown model {model!r}; expected pi0 or pi05")
  _require_plots()
  try:
    summary = dg.run_diagnose(model, size=size, out=out, calib_batches=calib_batches, seed=seed,
                              log=lambda s: typer.echo(s, err=True))
  except ValueError as e:
    fail(str(e))
  typer.echo(summary)
