"""`duquant-jax serve CKPT`: a packed checkpoint behind openpi's websocket policy protocol.

Mounted on the typer app by `duquant_jax.cli.app`. Flags map to `duquant_jax.serve` / `openpi_io`;
every expected failure before serving is one `error: ...` line on stderr with exit code 2.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Optional

import jax
import typer

from duquant_jax import checkpoint as ck
from duquant_jax.cli.errors import fail
from duquant_jax.models import get_policy
from duquant_jax.runtime import PackedRuntime
from duquant_jax.openpi_io import (PaligemmaTokenizer, RequestAdapter, find_norm_stats,
                                   load_norm_stats)
from duquant_jax.serve import PolicyRunner, ServeConfig, serve_forever


def build_runner(ckpt: str, *, model: Optional[str] = None, size: Optional[str] = None,
                 tokenizer: Optional[str] = None, norm_stats: Optional[str] = None,
                 norm_mode: str = "auto", num_steps: int = 10, action_dims: Optional[int] = None,
                 record: Optional[str] = None, seed: int = 0,
                 discrete_state: Optional[bool] = None, unroll_layers: bool = False,
                 attention: str = "pallas"):
  """The `PolicyRunner` that `serve` runs, from a packed checkpoint and the command's flags.

  Args:
    ckpt: a packed checkpoint directory (`duquant-jax convert`).
    model, size: the policy (default: the checkpoint's metadata, written by `convert`).
    tokenizer: a PaliGemma SentencePiece model file; None: requests carry tokenized prompts.
    norm_stats: openpi's norm_stats.json (file or directory); None: the checkpoint's own
      (`CKPT/norm_stats.json` or `CKPT/assets/**/norm_stats.json`), else those of the openpi
      checkpoint it was converted from (its metadata's `source`), if any; "none": off.
    norm_mode: "auto" (openpi's: quantile for pi0.5, z-score for pi0), "zscore" or "quantile".
    num_steps, action_dims, record, seed, discrete_state: as in `PolicyRunner` /
      `RequestAdapter`.
    unroll_layers: compile each layer on its own instead of scanning the layer stack
      (`Pi0Config.unroll_layers`): a longer compile for fewer, fuller kernels per call.
    attention: how Gemma's attention is computed (`Pi0Config.attention`): "pallas" (one kernel
      per layer and call where the program runs on CUDA, openpi's einsum form elsewhere) or
      "einsum" (openpi's form everywhere).

  Raises:
    ValueError, FileNotFoundError (CheckpointError is a ValueError) with one clear message.
  """
  if norm_mode not in ("auto", "zscore", "quantile"):
    raise ValueError(f"--norm-mode must be auto, zscore or quantile, got {norm_mode!r}")
  meta = ck.read_info(ckpt)["metadata"]
  model = model or meta.get("model")
  size = size or meta.get("size")
  if model is None or size is None:
    raise ValueError(f"{ckpt}: its metadata does not name the model and size; "
                     "pass --model and --size")
  policy = get_policy(model, size, unroll_layers=unroll_layers, attention=attention,
                      runtime=PackedRuntime())
  params, cfg, _, _ = ck.load_packed(ckpt)
  if norm_stats is None:  # the packed checkpoint's own, else those of the checkpoint it came from
    found = None
    for d in _norm_stats_dirs(ckpt, meta.get("source")):
      found = find_norm_stats(d)
      if found is not None:
        break
    stats = load_norm_stats(found) if found is not None else {}
  elif norm_stats.lower() == "none":
    stats = {}
  else:
    stats = load_norm_stats(norm_stats)
  quantile = policy.cfg.pi05 if norm_mode == "auto" else norm_mode == "quantile"
  tok = None if tokenizer is None else PaligemmaTokenizer(tokenizer, policy.cfg.max_token_len)
  adapter = RequestAdapter(cfg=policy.cfg, norm_stats=stats, quantile=quantile, tokenizer=tok,
                           action_dims=action_dims, discrete_state=discrete_state)
  return PolicyRunner(policy, params, adapter, num_steps=num_steps, seed=seed, record_dir=record,
                      metadata={"preset": cfg.name, "size": size,
                                "checkpoint": pathlib.Path(ckpt).name})


def _norm_stats_dirs(ckpt: str, source: Optional[str]) -> list[pathlib.Path]:
  dirs = [pathlib.Path(ckpt)]
  if source:
    src = pathlib.Path(source)
    dirs += [src, src.parent] if src.name == "params" else [src]
  return [d for d in dirs if d.is_dir()]


def serve(
    ckpt: str = typer.Argument(..., help="packed checkpoint directory (from `convert`)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, help="TCP port (openpi's default 8000; 0 picks a free one)"),
    api_key: Optional[str] = typer.Option(
        None, envvar="DUQUANT_API_KEY",
        help="require this key (clients send `Authorization: Api-Key KEY`); env DUQUANT_API_KEY"),
    tokenizer: Optional[str] = typer.Option(
        None, help="PaliGemma SentencePiece model file, to tokenise requests' 'prompt'"),
    norm_stats: Optional[str] = typer.Option(
        None, help="openpi norm_stats.json (file or dir); default: the checkpoint's; none: off"),
    norm_mode: str = typer.Option("auto", help="auto (quantile for pi05), zscore or quantile"),
    num_steps: int = typer.Option(10, help="flow-matching steps per request"),
    action_dims: Optional[int] = typer.Option(None, help="reply with the first N action dims"),
    max_message_mb: float = typer.Option(64.0, help="larger requests get an error reply"),
    record: Optional[str] = typer.Option(
        None, help="save every served observation here (npz), for `convert --calib-from`"),
    discrete_state: Optional[bool] = typer.Option(
        None, "--discrete-state/--no-discrete-state",
        help="state in the prompt (openpi's discrete_state_input; default: on for pi05)"),
    model: Optional[str] = typer.Option(None, help="pi0 or pi05 (default: the checkpoint's)"),
    size: Optional[str] = typer.Option(None, help="full, dummy or demo (default: checkpoint's)"),
    seed: int = typer.Option(0, help="seed of the sampling noise"),
    unroll_layers: bool = typer.Option(
        True, "--unroll-layers/--scan-layers",
        help="compile every layer on its own (the default: fewer, fuller kernels per call, "
             "about 20% less latency on an H100 for a compile about 2x as long; pair it with "
             "--compile-cache), or scan the layer stacks as openpi does (a quicker start)"),
    attention: str = typer.Option(
        "pallas", help="Gemma's attention: pallas (one kernel per layer and call on CUDA GPUs; "
                       "openpi's einsum form elsewhere) or einsum (openpi's form everywhere)"),
    compile_cache: Optional[str] = typer.Option(
        None, help="directory for jax's persistent compilation cache: a restarted server "
                   "loads the compiled policy instead of compiling it again")):
  """Serves a packed checkpoint to openpi clients (openpi-client's WebsocketClientPolicy)."""
  if compile_cache:  # process-wide, so set here at the command's edge, not in the library
    jax.config.update("jax_compilation_cache_dir", compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)
  try:
    cfg = ServeConfig(host=host, port=port, api_key=api_key,
                      max_message_bytes=int(max_message_mb * (1 << 20)))
    runner = build_runner(ckpt, model=model, size=size, tokenizer=tokenizer,
                          norm_stats=norm_stats, norm_mode=norm_mode, num_steps=num_steps,
                          action_dims=action_dims, record=record, seed=seed,
                          discrete_state=discrete_state, unroll_layers=unroll_layers,
                          attention=attention)
    typer.echo(f"compiling {runner.metadata['model']} ({runner.metadata['size']}) ...")
    seconds = runner.warmup()
  except (ValueError, FileNotFoundError, TypeError) as e:
    fail(str(e))
  stats = runner.metadata["norm_stats"] or "none"
  typer.echo(f"compiled in {seconds:.1f} s; norm stats {stats}, "
             f"tokenizer {'yes' if runner.metadata['tokenizer'] else 'no'}"
             + (f", recording to {record}" if record else ""))

  def ready(bound: int) -> None:
    typer.echo(f"serving on ws://{host}:{bound}" + (" (API key required)" if api_key else ""))

  try:
    serve_forever(runner, cfg, ready, warmup=False)
  except OSError as e:  # e.g. the port is taken
    fail(f"cannot listen on {host}:{port}: {e}")
  except KeyboardInterrupt:
    typer.echo("stopped")
