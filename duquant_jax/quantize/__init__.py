"""`quantize_params`: DuQuant W4A8 as a pure pytree transform of an openpi-layout param tree.

For each group of linears that read the same input (q / kv after one RMSNorm; gate / up are one
weight), following DuQuant (Lin et al., "DuQuant: Distributing Outliers via Dual Transformation
Makes Stronger Quantized LLMs", NeurIPS 2024) with the corrections of docs/design.md, in four
steps:
  1. plan (`plan`): group the linears by shared input, order the groups, check rules, weights and
     stats;
  2. transform (`transform`): smoothing lam = max|x|^a / max|W|^(1-a) from calibration stats,
     block rotation R1 (greedy, activation-aware, orthogonal factors from `jnp.linalg.qr`), zigzag
     permutation, block rotation R2, all batched over layers and blocks;
  3. fold (`fold`): 1/lam folded into the preceding RMSNorm scale (pi0.5's adaptive norm: its scale
     and shift modulation; SigLIP: the LayerNorm) or into the producer of the down projection's
     input, otherwise merged into the online rotation;
  4. pack (`pack`): the weight W' = T^T diag(lam) W is quantized per output channel / head / group
     to int4, symmetric or asymmetric, with a per-channel clip searched to minimise output MSE on
     the transformed calibration activations; the codes are then rounded to nearest or, where the
     rule asks (`rounding="gptq"`), by GPTQ against the Hessian of the transformed input
     (`duquant_jax.gptq`); the result is a `PackedLinear` at the weight's path, whose activations
     are quantized per token to int8 at run time.
Token embedding tables matching an `EmbeddingRule` become `PackedEmbedding`s (weight-only, row-wise;
`duquant_jax.embedding`): a gather needs no input transform.
Everything is deterministic in (params, cfg, stats): rotation keys derive from `cfg.seed` and the
layer path.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
from tqdm import tqdm

from duquant_jax.config import QuantConfig
from duquant_jax.model_rotation import rotated_readers
from duquant_jax.quantize.fold import (Folded, adarms_dense_folded, fold_smoothing,
                                       folded_smoothing, producer_smoothing)
from duquant_jax.quantize.pack import (PackJob, pack_embeddings, pack_group, pack_layers,
                                       prepare_pack)
from duquant_jax.quantize.plan import (GroupPlan, check_rules, group_order, plan_group,
                                       plan_layouts, rotated_model, touches)
from duquant_jax.quantize.summary import PackSummary, packed_items, summarize
from duquant_jax.quantize.transform import build_transform, weight_array
from duquant_jax.treepath import copy_dicts, get_path, set_path

__all__ = ["Folded", "GroupPlan", "PackJob", "PackSummary", "adarms_dense_folded",
           "build_transform", "check_rules",
           "fold_smoothing", "folded_smoothing", "pack_group", "pack_layers", "packed_items", "plan_group",
           "prepare_pack", "producer_smoothing", "quantize_params", "rotated_model", "summarize"]

Params = dict[str, Any]


def quantize_params(params: Params, cfg: QuantConfig, stats: Any = None, *,
                    progress: bool = False) -> Params:
  """Maps an openpi-layout param tree to a packed one (pure: `params` is not modified).

  Args:
    params: the model's param tree (the dict holding 'PaliGemma', ...), float arrays.
    cfg: the rules; linears matching no rule (or a skip rule) stay in floating point.
    stats: calibration statistics (`duquant_jax.calibrate.CalibStats`, or a mapping from weight path
      to an object with `absmax` (stack..., K) and `samples` (stack..., R, K)). Needed for smoothing
      and the greedy rotation; optional for activation-free choices (RTN, random / Hadamard rotations).
    progress: show a progress bar over the groups of linears (for the CLI).

  Returns:
    A tree of the same structure where each quantized weight is a `PackedLinear` and norms carry the
    folded smoothing. Run it with `Policy(cfg, runtime=PackedRuntime()).sample_actions` (or any
    flax module via `duquant_jax.runtime.quantized_apply`).

  Each group of linears reading one input goes through plan -> transform -> fold -> pack
  (`plan_group`, `build_transform`, `fold_smoothing`, `prepare_pack` then `pack_group`). Groups are
  packed in order; each group's stacked layers are packed (one jitted call per layer) in a
  background thread while this thread reads the next group's weights and builds its transform, so
  at most two groups' weights are held at once. The result does not depend on that overlap (the
  same programs on the same inputs).

  Token embedding tables matching one of `cfg.embeddings` become `PackedEmbedding`s. With
  `cfg.rotate_residual` the float model is first rotated (`rotated_model`; the returned tree's
  float leaves are the rotated ones) and `stats` are mapped to its inputs; linears reading a
  rotated stream are not smoothed. Rules with `act_scale="static"` get static activation scales
  from the calibration rows (`PackedLinear.act_scale`).

  Raises:
    ValueError: NaN/Inf weights or stats, missing stats where needed, block sizes that do not divide
      the width or head_dim, rules that disagree on a shared input, per-head scales without heads,
      an embedding rule that matches no declared embedding table, group sizes not dividing D,
      static activation scales without stats, linears of one input quantizing it differently,
      `rotate_residual` on a tree it cannot rotate (see `model_rotation.rotate_residual`).
  """
  # Readers of a rotated residual stream are not smoothed: the rotation has spread their outlier
  # channels already (smoothing on top measured worse on the demo, EVALUATION.md).
  unsmoothed = rotated_readers(params) if cfg.rotate_residual else set()
  params, stats = rotated_model(params, cfg, stats)
  layouts = plan_layouts(params, cfg, stats)
  check_rules(cfg, layouts)
  out = copy_dicts(params)
  for path, table in pack_embeddings(params, cfg).items():
    set_path(out, path, table)
  items = group_order(layouts, cfg)
  # Two stages: this thread reads a group's weights and builds its transform (folding smoothing
  # into norms and producers, in group order), then hands the per-layer packing to one
  # background thread and goes on to the next group, so reading a streamed checkpoint, building
  # transforms and compiling overlap the packing of the group before. At most one group packs
  # at a time; a group whose preparation touches a weight of the packing group waits for it.
  cancel = threading.Event()
  bar = tqdm(total=len(items), desc="pack", unit="group", disable=not progress)
  pending, pending_paths = None, set()

  def finish():
    for path, packed in pending.result():
      set_path(out, path, packed)
    bar.update(1)

  with ThreadPoolExecutor(1, thread_name_prefix="duquant-pack") as pool:
    try:
      for group, members in items:
        if pending is not None and touches(members) & pending_paths:
          finish()
          pending = None
        weights = {m.path: weight_array(get_path(out, m.path)) for m in members}  # folds so far
        pack = _prepare_group(out, cfg, stats, group, members, weights, unsmoothed=unsmoothed,
                              cancelled=cancel.is_set)
        if pending is not None:
          finish()
        if any(isinstance(w, jax.core.Tracer) for w in weights.values()):
          pending = Future()  # abstract evaluation (`jax.eval_shape`): tracers stay in this thread
          pending.set_result(pack())
        else:
          pending = pool.submit(lambda pack=pack: [(p, jax.block_until_ready(v))
                                                   for p, v in pack()])
        pending_paths = {m.path for m in members}
      if pending is not None:
        finish()
    except BaseException:
      cancel.set()  # the packing thread stops at its next layer
      raise
    finally:
      bar.close()
  return out


def _prepare_group(out: Params, cfg: QuantConfig, stats: Any, group: str, members: list,
                   weights: dict[str, Any], *, unsmoothed: set[str], cancelled):
  """Plan, transform and fold one group on this thread (writing the folds into `out`); returns
  its packing as a function of no arguments, for the packing thread."""
  plan = plan_group(cfg, stats, group, members, weights, unsmoothed=unsmoothed)
  transform, lam = build_transform(plan, weights)
  folded = fold_smoothing(out, plan, transform, lam, weights)
  for path, leaf in folded.updates.items():
    set_path(out, path, leaf)
  job = prepare_pack(plan, transform, folded, cfg)
  return functools.partial(pack_group, job, weights, cancelled=cancelled)
