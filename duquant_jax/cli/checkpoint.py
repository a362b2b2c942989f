"""Checkpoint commands of the `duquant-jax` CLI: export-demo-fp, convert, inspect.

Mounted on the typer app by `duquant_jax.cli.app`. Flags map to library calls
(`duquant_jax.checkpoint`, `calibrate`, `quantize_params`); every expected failure is one
`error: ...` line on stderr with exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Optional

import jax
import typer

from duquant_jax import calib_data
from duquant_jax import checkpoint as ck
from duquant_jax import openpi_checkpoint as oc
from duquant_jax.attention_balance import balance_attention
from duquant_jax.calibrate import CalibConfig, calibrate, hessian_for, load_stats, select_for
from duquant_jax.checkpoint import INFO_FILE, _quiet_orbax
from duquant_jax.cli.errors import fail
from duquant_jax.config import QuantConfig, get_preset, match_rules
from duquant_jax.embedding import PackedEmbedding
from duquant_jax.lab.synthetic import realistic_params
from duquant_jax.layouts import linear_layouts
from duquant_jax.lora import LoraSpec
from duquant_jax.models import get_policy
from duquant_jax.quantize import packed_items, quantize_params, summarize


def _fail(message: str) -> None:
  """One `error:` line, then stderr closed: orbax's threads may still print tracebacks of a failed
  read while the process exits."""
  try:
    fail(message)
  finally:
    sys.stderr.flush()
    try:
      devnull = os.open(os.devnull, os.O_WRONLY)
      os.dup2(devnull, 2)
      os.close(devnull)
    except OSError:
      pass


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
    n /= 1024
  return str(n)


def _load_rules(path: str):
  """A QuantConfig from a JSON file (QuantConfig.to_dict format, or {"rules": [...]} only)."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"{p}: no such rules file")
  try:
    d = json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{p}: not valid JSON ({e})") from None
  if isinstance(d, list):
    d = {"rules": d}
  d.setdefault("name", p.stem)
  return QuantConfig.from_dict(d)


def _load_stats(path: str):
  """CalibStats from a packed checkpoint's stats/ or a `calibrate.save_stats` directory."""
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"{p}: no such stats directory or checkpoint")
  if (p / INFO_FILE).is_file():
    if not (p / "stats").is_dir():
      raise ValueError(f"{p}: a packed checkpoint without calibration stats")
    p = p / "stats"
  try:
    with _quiet_orbax():
      return load_stats(p)
  except Exception as e:  # orbax raises many types for a directory that is not stats
    raise ValueError(f"{p}: not readable as calibration stats ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})"[:300]) from None


def _summary_lines(packed, cfg, params_fp) -> list[str]:
  s = summarize(packed)
  report = match_rules(cfg, linear_layouts(params_fp))
  lines = ["layers per rule:"]
  for rule in cfg.rules:
    paths = report.matched.get(rule.pattern, [])
    tag = "skip (float)" if rule.skip else f"W{rule.weight_bits}A{rule.act_bits or 'fp'}"
    if rule.act_min_tokens and not rule.skip:
      tag += f" (fp below {rule.act_min_tokens} tokens)"
    if rule.act_bits is not None and rule.act_scale == "static" and not rule.skip:
      tag += " static"
    lines.append(f"  {len(paths):4d} weights  {tag:10s}  {rule.pattern}")
  lines += [f"  {line}" for line in report.unused_lines()]
  lines.append(f"  {len(report.unmatched_layers):4d} linear weights matched no rule "
               "(kept in float)")
  tables = [p for p, leaf in packed_items(packed) if isinstance(leaf, PackedEmbedding)]
  for e in cfg.embeddings:
    n = sum(1 for p in tables if cfg.embedding_rule_for(p) is e)
    lines.append(f"  {n:4d} tables   W{e.bits} emb    {e.pattern}")
  bits = sorted(set(s.bits.values()))
  lines.append(f"quantized: {s.layers_quantized} linear layers in {len(s.bits)} weights, "
               f"weight bits {bits}")
  ratio = s.weight_bytes_fp / max(s.weight_bytes_packed, 1)
  lines.append(f"bytes of quantized weights: {_human(s.weight_bytes_fp)} (bf16) -> "
               f"{_human(s.weight_bytes_packed)} packed ({ratio:.2f}x smaller), "
               f"{s.bits_per_weight:.2f} stored bits per weight")
  lines.append(f"bytes of all weights (float leaves as bf16): {_human(s.tree_bytes_bf16)} -> "
               f"{_human(s.tree_bytes_packed)} ({s.tree_ratio:.3f}x)")
  return lines


def export_demo_fp(
    dst: str = typer.Argument(..., help="checkpoint directory to create (params/ goes inside)"),
    model: str = typer.Option("pi0", help="pi0 or pi05"),
    size: str = typer.Option("demo", help="demo or dummy"),
    seed: int = typer.Option(0, help="seed of the synthetic weights"),
    force: bool = typer.Option(False, "--overwrite", "--force", help="replace DST")):
  """Writes the demo model's realistic float params in openpi's checkpoint format."""
  if size == "full":
    _fail("export-demo-fp writes synthetic weights for the demo or dummy sizes only")
  try:
    policy = get_policy(model, size)
    params = realistic_params(policy, seed)
    out = oc.save_openpi_params(dst, params, force=force)
  except (ValueError, FileExistsError, FileNotFoundError) as e:
    _fail(str(e))
  typer.echo(f"wrote {model} {size} float params (seed {seed}) to {out}/params")

def convert(
    src: str = typer.Argument(..., help="openpi checkpoint: <ckpt>, <ckpt>/params, a training "
                              "step <run>/<step>, or a run (its last step)"),
    dst: str = typer.Argument(..., help="packed checkpoint directory to create"),
    preset: Optional[str] = typer.Option(None, help="named QuantConfig preset"),
    rules: Optional[str] = typer.Option(
        None, help="JSON file with a QuantConfig (overrides --preset)"),
    model: Optional[str] = typer.Option(
        None, help="pi0 or pi05 (default: inferred from the shapes)"),
    size: Optional[str] = typer.Option(None, help="full, dummy or demo (default: inferred)"),
    calib: Optional[str] = typer.Option(None, help=".npz of calibration observations (G, B, ...)"),
    calib_from: Optional[str] = typer.Option(
        None, help="folder of observations recorded by `serve --record` (batches of --batch-size)"),
    calib_batches: int = typer.Option(
        16, help="toy-env batches when no --calib (capped by the preset)"),
    batch_size: int = typer.Option(4, help="observations per toy-env calibration batch"),
    seed: int = typer.Option(0, help="calibration seed"),
    stats_from: Optional[str] = typer.Option(
        None, "--stats", help="calibration stats to use instead of calibrating: a packed "
        "checkpoint holding stats/ (e.g. converted on a GPU machine) or a calibrate.save_stats "
        "directory; the conversion then streams the weights"),
    lora_alpha: Optional[float] = typer.Option(
        None, help="LoRA alpha of a LoRA fine-tune's attention (default: the rank, as openpi's "
        "gemma_2b_lora / gemma_300m_lora; openpi's MLP LoRA is unscaled)"),
    lora_rslora: bool = typer.Option(False, "--lora-rslora",
                                     help="rank-stabilised LoRA: scaling alpha / sqrt(rank)"),
    rounding: Optional[str] = typer.Option(
        None, help="nearest or gptq for every rule (default: the preset's; gptq needs "
        "calibration and costs packing time, BENCHMARKS.md)"),
    overwrite: bool = typer.Option(False, "--overwrite", "--force", help="replace DST")):
  """Quantizes an openpi float checkpoint (released, training state or LoRA fine-tune) to a
  packed W4A8 checkpoint. Written to a temporary sibling and renamed: never half-written."""

  times = {}
  bar = sys.stderr.isatty()  # progress bars only on a terminal: logs and pipes get clean lines
  try:
    if rules is not None:
      cfg = _load_rules(rules)
    elif preset is not None:
      cfg = get_preset(preset)
    else:
      raise ValueError("give --preset NAME or --rules FILE.json")
    if rounding is not None:
      if rounding not in ("nearest", "gptq"):
        raise ValueError(f"--rounding must be nearest or gptq, got {rounding!r}")
      cfg = dataclasses.replace(cfg, rules=tuple(dataclasses.replace(r, rounding=rounding)
                                                 for r in cfg.rules))
    lora = LoraSpec(alpha=lora_alpha, rslora=lora_rslora)
    if pathlib.Path(dst).exists() and not overwrite:
      raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
    t = time.perf_counter()
    source = oc.open_openpi(src, infer=False)
    if model is None or size is None:
      inferred = oc.infer_model(source.shapes)
      model, size = model or inferred[0], size or inferred[1]
    policy = get_policy(model, size)
    oc.check_layout(source.shapes, policy.param_shapes(), where=str(source.params_dir))
    found = [f"{model} {size}"]
    if source.wrapped:
      found.append("training state (nnx.State) unwrapped")
    if source.lora:
      ranks = sorted({lw.rank for lw in source.lora.values()})
      found.append(f"LoRA merged into {len(source.lora)} weights (rank {ranks}, "
                   f"alpha {lora_alpha if lora_alpha is not None else 'rank'}"
                   f"{', rslora' if lora_rslora else ''})")
    typer.echo("source: " + "; ".join(found))

    stats = None
    needs_stats = any(not r.skip and (r.smooth_alpha is not None or r.rotation == "greedy"
                                      or r.rounding == "gptq" or r.act_scale == "static")
                      for r in cfg.rules)
    balancing = cfg.attention_balance is not None
    if balancing and stats_from is not None:
      raise ValueError("the config balances attention (attention_balance), which runs the FP and "
                       "the packed policy on calibration batches: drop --stats")
    calibrating = (needs_stats or balancing or calib is not None
                   or calib_from is not None) and stats_from is None
    if stats_from is not None:
      stats = _load_stats(stats_from)
    if calibrating:  # a forward pass needs the whole model in memory
      params = oc.load_openpi_params(src, policy, lora=lora)
    else:  # streamed: each weight is read when it is packed
      params = source.lazy_tree(lora=lora)
    times["load"] = time.perf_counter() - t

    if calibrating:
      t = time.perf_counter()
      if calib is not None:
        batches = calib_data.load_npz_batches(calib, policy.cfg)
        calib_source = calib
      elif calib_from is not None:
        batches = calib_data.load_recordings(calib_from, policy.cfg, batch_size=batch_size)
        calib_source = f"recordings {calib_from}"
      else:
        g = max(1, min(calib_batches, cfg.calib_batches))
        batches = calib_data.calibration_batches(policy, params, jax.random.key(seed),
                                                 num_batches=g, batch_size=batch_size)
        calib_source = f"toy-env rollouts ({g} x {batch_size})"
      times["calibration data"] = time.perf_counter() - t
      t = time.perf_counter()
      stats = calibrate(policy, params, batches,
                        CalibConfig(select=select_for(cfg, params), progress=bar,
                                    hessian=hessian_for(cfg, params)),
                        rng=jax.random.key(seed + 1))
      times["calibrate"] = time.perf_counter() - t
    else:
      calib_source = None if stats_from is None else f"stats of {stats_from}"

    t = time.perf_counter()
    packed = jax.block_until_ready(quantize_params(params, cfg, stats, progress=bar))
    times["quantize"] = time.perf_counter() - t
    if balancing:
      t = time.perf_counter()
      packed, _ = balance_attention(policy, params, packed, batches, cfg,
                                    rng=jax.random.key(seed + 1))
      times["attention balance"] = time.perf_counter() - t
    t = time.perf_counter()
    packed = oc.read_lazy_leaves(packed)  # the float leaves of a streamed conversion
    meta = {"source": str(pathlib.Path(src).absolute()), "preset": cfg.name, "model": model,
            "size": size, "calibration": calib_source, "training_state": source.wrapped,
            "lora_merged": sorted(source.lora)}
    if source.lora:
      meta["lora"] = {"alpha": lora_alpha, "rslora": lora_rslora}
    out = ck.save_packed(dst, packed, cfg, stats, meta, force=overwrite)
    times["save"] = time.perf_counter() - t
  except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as e:
    _fail(str(e))
  except KeyboardInterrupt:  # the temporary output is gone already (checkpoint.atomic_dir)
    _fail(f"interrupted; {dst} was not written")
  for line in _summary_lines(packed, cfg, params):
    typer.echo(line)
  typer.echo("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
  typer.echo(f"wrote {out}")

def inspect(
    ckpt: str = typer.Argument(..., help="packed checkpoint directory"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    quick: bool = typer.Option(False, "--quick", help="read only the JSON header, not the arrays")):
  """What a packed checkpoint holds; reads (and so verifies) every array unless --quick."""
  try:
    info = ck.read_info(ckpt)
    checked = None
    if not quick:
      checked = ck.verify_files(ckpt, hashes=True)
      ck.load_packed(ckpt, verify=False)
  except (ValueError, FileNotFoundError) as e:
    _fail(str(e))
  meta, cfg = info["metadata"], info["config"]
  bits = meta.get("bits", {})
  out = {
      "path": str(pathlib.Path(ckpt).absolute()),
      "preset": meta.get("preset", cfg.get("name")),
      "source": meta.get("source"),
      "created": meta.get("created"),
      "library_version": meta.get("library_version"),
      "layers_quantized": meta.get("layers_quantized"),
      "packed_weights": len(info["structure"]),
      "bits": bits,
      "rules": [{k: r[k] for k in ("pattern", "skip", "weight_bits", "act_bits", "act_min_tokens",
                                   "act_scale", "block_size", "rotation") if k in r}
                for r in cfg.get("rules", [])],
      "bytes_fp_bf16": meta.get("bytes_fp_bf16"),
      "bytes_packed": meta.get("bytes_packed"),
      "bytes_on_disk": sum(v[0] for v in info["manifest"].values()),
      "has_stats": info.get("has_stats", False),
      "verified": not quick,
  }
  if as_json:
    typer.echo(json.dumps(out, indent=1))
    return
  typer.echo(f"{out['path']}")
  typer.echo(f"  preset {out['preset']}, created {out['created']}, duquant-jax "
             f"{out['library_version']}")
  typer.echo(f"  source {out['source']}")
  typer.echo(f"  {out['layers_quantized']} linear layers in {out['packed_weights']} packed weights,"
             f" bits {sorted(set(bits.values()))}")
  for r in out["rules"]:
    typer.echo(f"  rule {r.get('pattern')}: "
               + ("skip" if r.get("skip") else f"W{r.get('weight_bits')}A{r.get('act_bits') or 16}")
               + (f" (fp below {r['act_min_tokens']} tokens)" if r.get("act_min_tokens") else "")
               + (" (static act scale)" if r.get("act_scale") == "static" and r.get("act_bits")
                  else ""))
  if out["bytes_fp_bf16"] is not None:
    typer.echo(f"  quantized weights {_human(out['bytes_fp_bf16'])} (bf16) -> "
               f"{_human(out['bytes_packed'])}; {_human(out['bytes_on_disk'])} on disk")
  typer.echo(f"  calibration stats: {'yes' if out['has_stats'] else 'no'}; "
             + (f"verified {_human(checked)} of files and every array" if not quick
                else "not verified (--quick)"))
