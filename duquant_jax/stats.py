"""Streaming per-input-channel activation statistics of one linear layer, and reading them out.

DuQuant (Lin et al., NeurIPS 2024, "DuQuant: Distributing Outliers via Dual Transformation") builds its
smoothing factors, greedy block rotations and zigzag permutation from calibration activations. This
module holds what calibration keeps of the input x of one linear y = x W, accumulated over a whole
stream of batches in constant memory:

  absmax        (L, K)       max |x| per input channel;
  sum_sq        (L, K)       sum of x^2 per channel (mean square = sum_sq / count);
  hist          (L, K, NB)   counts of |x| in fixed log-spaced bins (`HistSpec`), so any percentile of
                             the whole stream can be read at the end (`percentile`), not a max of
                             per-batch percentiles;
  token_hist    (L, NB)      counts of the per-token max_k |x_k| in the same bins (`token_percentile`);
  samples       (L, R, K)    a bounded reservoir of activation rows: the R rows of largest priority
                             (uniform random keys drawn from the calibration rng), i.e. a uniform sample
                             without replacement of all valid rows, identical across the L layers;
  sample_priority (R,)       the reservoir's keys (-inf for a slot not filled yet);
  count         ()           valid rows (tokens) seen;
  step_absmax   (S, L, K)    optional: max |x| per flow step (action expert only), else None;
  hessian       (L, NB, HB, HB) optional: X^T X in float32, for GPTQ rounding (`duquant_jax.gptq`),
                             as NB diagonal blocks of HB channels (K = NB * HB; NB = 1 is the full
                             Hessian), so its memory is L * K * HB * 4 bytes, not L * K^2 * 4.

Axes: L layers (the `nn.scan` depth axis; absent for an unstacked linear), K the flattened contraction
size of the linear's input (attention output: K = N * H in (N, H) order), N rows (tokens), R reservoir
rows, S flow steps, NB histogram bins (and Hessian blocks), HB channels per Hessian block.

Counts are int32: a stream of at most 2**31 - 1 tokens per linear.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class HistSpec:
  """Fixed log-spaced bins for |x|: [0, 2^min_exp), then `bins_per_octave` bins per power of two up
  to 2^max_exp, then [2^max_exp, inf). Neighbouring edges differ by a factor 2^(1 / bins_per_octave)."""

  min_exp: int = -16  # lowest finite edge 2**min_exp; smaller |x| (and zeros) go to bin 0
  max_exp: int = 16  # highest finite edge 2**max_exp; larger |x| go to the last bin
  bins_per_octave: int = 4  # resolution: 4 -> edges 19% apart

  def __post_init__(self):
    if self.max_exp <= self.min_exp:
      raise ValueError(f"HistSpec: max_exp {self.max_exp} must exceed min_exp {self.min_exp}")
    if not 1 <= self.bins_per_octave <= 64:
      raise ValueError(f"HistSpec: bins_per_octave {self.bins_per_octave} must be in [1, 64]")

  @property
  def num_bins(self) -> int:
    """NB: the log-spaced bins plus the underflow and overflow bins."""
    return (self.max_exp - self.min_exp) * self.bins_per_octave + 2

  def edges(self) -> np.ndarray:
    """(NB + 1,) float64 bin edges [0, 2^min_exp, ..., 2^max_exp, inf]."""
    inner = 2.0 ** (self.min_exp + np.arange(self.num_bins - 1) / self.bins_per_octave)
    return np.concatenate([[0.0], inner, [np.inf]])

  def bin_index(self, a: jax.Array) -> jax.Array:
    """Bin (int32, same shape) of non-negative values a; bin b holds edges[b] <= a < edges[b + 1]."""
    a = jnp.asarray(a, jnp.float32)
    tiny = jnp.float32(2.0 ** (self.min_exp - 1))
    pos = (jnp.log2(jnp.maximum(a, tiny)) - self.min_exp) * self.bins_per_octave
    return jnp.clip(jnp.floor(pos) + 1, 0, self.num_bins - 1).astype(jnp.int32)


@flax.struct.dataclass
class ChannelStats:
  """Calibration statistics of one linear's input (see the module docstring for every field).

  Invariants: `hist.sum(-1) == count` for every (layer, channel); `token_hist.sum(-1) == count`;
  `absmax >= percentile(stats, q)` for every q; rows of `samples` whose `sample_priority` is -inf are
  empty (zeros) and appear only while fewer than R valid rows have been seen.
  """

  absmax: jax.Array
  sum_sq: jax.Array
  hist: jax.Array
  token_hist: jax.Array
  samples: jax.Array
  sample_priority: jax.Array
  count: jax.Array
  step_absmax: jax.Array | None = None
  hessian: jax.Array | None = None
  spec: HistSpec = flax.struct.field(pytree_node=False, default=HistSpec())
  stacked: bool = flax.struct.field(pytree_node=False, default=True)  # leading L axis present

  @property
  def num_channels(self) -> int:
    return self.absmax.shape[-1]

  @property
  def num_layers(self) -> int | None:
    """L, or None for an unstacked linear."""
    return self.absmax.shape[0] if self.stacked else None


def init_channel_stats(*, num_layers: int, num_channels: int, num_samples: int, spec: HistSpec,
                       num_steps: int | None = None,
                       hessian_block: int | None = None) -> ChannelStats:
  """Empty stats with an explicit L axis (use L = 1 and `squeeze_layers` for an unstacked linear).

  `hessian_block` HB (must divide K): keep the Hessian as K / HB diagonal blocks; None: no Hessian.
  """
  l, k, r = num_layers, num_channels, num_samples
  hessian = None
  if hessian_block is not None:
    if k % hessian_block:
      raise ValueError(f"hessian_block {hessian_block} does not divide the input width K={k}")
    hessian = jnp.zeros((l, k // hessian_block, hessian_block, hessian_block), jnp.float32)
  return ChannelStats(
      absmax=jnp.zeros((l, k), jnp.float32), sum_sq=jnp.zeros((l, k), jnp.float32),
      hist=jnp.zeros((l, k, spec.num_bins), jnp.int32),
      token_hist=jnp.zeros((l, spec.num_bins), jnp.int32),
      samples=jnp.zeros((l, r, k), jnp.float32),
      sample_priority=jnp.full((r,), -jnp.inf, jnp.float32), count=jnp.zeros((), jnp.int32),
      step_absmax=None if num_steps is None else jnp.zeros((num_steps, l, k), jnp.float32),
      hessian=hessian, spec=spec, stacked=True)


def masked_absmax(rows: jax.Array, mask: jax.Array) -> jax.Array:
  """rows (L, N, K), mask (N,) bool -> (L, K) max |x| over valid rows (0 if none)."""
  a = jnp.abs(rows.astype(jnp.float32))
  return jnp.max(jnp.where(mask[None, :, None], a, 0.0), axis=1)


def _scatter_hist(hist: jax.Array, bins: jax.Array, weight: jax.Array) -> jax.Array:
  """hist (L, K, NB) += counts of bins (L, N, K) with weights (L, N, K) (1 valid, 0 padding).

  One flat scatter-add in the rows' own (L, N, K) order (a transpose first is ~3x slower on CPU).
  """
  l, k, nb = hist.shape
  base = (jnp.arange(l, dtype=jnp.int32)[:, None, None] * k
          + jnp.arange(k, dtype=jnp.int32)[None, None, :]) * nb
  flat = (base + bins).reshape(-1)
  return hist.reshape(-1).at[flat].add(weight.reshape(-1), mode="promise_in_bounds").reshape(hist.shape)


def accumulate(stats: ChannelStats, rows: jax.Array, mask: jax.Array,
               priority: jax.Array) -> ChannelStats:
  """Adds one batch of activation rows to the stats.

  Args:
    stats: stats with an explicit L axis (as from `init_channel_stats`).
    rows: (L, N, K) activations (any float dtype; accumulated in float32).
    mask: (N,) bool, False for padding rows, which change nothing.
    priority: (N,) float32 reservoir keys in [0, 1); rows with the R largest keys seen so far are kept.

  Returns:
    the updated stats (step_absmax untouched: see `update_step_absmax`).
  """
  x = rows.astype(jnp.float32)
  a = jnp.abs(x)
  spec = stats.spec
  w = jnp.broadcast_to(mask[None, :, None], a.shape)
  absmax = jnp.maximum(stats.absmax, jnp.max(jnp.where(w, a, 0.0), axis=1))
  sum_sq = stats.sum_sq + jnp.sum(jnp.where(w, x * x, 0.0), axis=1)
  bins = spec.bin_index(a)  # (L, N, K)
  hist = _scatter_hist(stats.hist, bins, w.astype(jnp.int32))
  tok_bins = spec.bin_index(jnp.max(a, axis=-1))  # (L, N)
  tok_w = jnp.broadcast_to(mask[None, :], tok_bins.shape).astype(jnp.int32)
  token_hist = _scatter_hist(stats.token_hist[:, None, :], tok_bins[..., None], tok_w[..., None])[:, 0]
  # Reservoir: keep the R rows of largest priority among the kept rows and this batch's valid rows.
  r = stats.sample_priority.shape[0]
  cand = jnp.concatenate([stats.sample_priority, jnp.where(mask, priority, -jnp.inf)])
  keep_priority, keep = jax.lax.top_k(cand, r)
  samples = jnp.take(jnp.concatenate([stats.samples, x], axis=1), keep, axis=1)
  hessian = stats.hessian
  if hessian is not None:
    l, n, k = x.shape
    nb, hb = hessian.shape[1:3]
    xb = jnp.where(mask[None, :, None], x, 0.0).reshape(l, n, nb, hb)
    hessian = hessian + jnp.einsum("LNBI,LNBJ->LBIJ", xb, xb, precision=jax.lax.Precision.HIGHEST)
  return stats.replace(absmax=absmax, sum_sq=sum_sq, hist=hist, token_hist=token_hist,
                       samples=samples, sample_priority=keep_priority, hessian=hessian,
                       count=stats.count + jnp.sum(mask, dtype=jnp.int32))


def update_step_absmax(stats: ChannelStats, step_absmax: jax.Array) -> ChannelStats:
  """Folds per-step maxima (S, L, K) of one batch into `stats.step_absmax`."""
  if stats.step_absmax is None:
    raise ValueError("these stats keep no per-step absmax (calibrate with per_step=True)")
  return stats.replace(step_absmax=jnp.maximum(stats.step_absmax, step_absmax))


def merge(a: ChannelStats, b: ChannelStats) -> ChannelStats:
  """Stats of the union of two streams (e.g. two hosts, or two calibration runs of one linear)."""
  if (a.spec, a.stacked) != (b.spec, b.stacked) or a.absmax.shape != b.absmax.shape:
    raise ValueError(f"cannot merge stats of different layouts: {a.absmax.shape=} {b.absmax.shape=}, "
                     f"{a.spec=} {b.spec=}")
  r = a.sample_priority.shape[0]
  s_axis = a.samples.ndim - 2
  keep_priority, keep = jax.lax.top_k(jnp.concatenate([a.sample_priority, b.sample_priority]), r)
  samples = jnp.take(jnp.concatenate([a.samples, b.samples], axis=s_axis), keep, axis=s_axis)
  step = None if a.step_absmax is None else jnp.maximum(a.step_absmax, b.step_absmax)
  if (a.hessian is None) != (b.hessian is None) or (
      a.hessian is not None and a.hessian.shape != b.hessian.shape):
    raise ValueError("cannot merge stats with and without a Hessian (or of other Hessian blocks)")
  hessian = None if a.hessian is None else a.hessian + b.hessian
  return a.replace(hessian=hessian, absmax=jnp.maximum(a.absmax, b.absmax), sum_sq=a.sum_sq + b.sum_sq,
                   hist=a.hist + b.hist, token_hist=a.token_hist + b.token_hist, samples=samples,
                   sample_priority=keep_priority, count=a.count + b.count, step_absmax=step)


def squeeze_layers(stats: ChannelStats) -> ChannelStats:
  """Drops the L = 1 axis of an unstacked linear's stats (marks them `stacked=False`)."""
  sq = lambda x: None if x is None else x[0]
  step = None if stats.step_absmax is None else stats.step_absmax[:, 0]
  return stats.replace(absmax=sq(stats.absmax), sum_sq=sq(stats.sum_sq), hist=sq(stats.hist),
                       token_hist=sq(stats.token_hist), samples=sq(stats.samples), step_absmax=step,
                       hessian=sq(stats.hessian),
                       stacked=False)


def _order_statistic(hist, cum, absmax, edges, rank):
  """Estimate of the value of integer rank `rank` (...) (0-based) from hist (..., NB): the bin that
  holds it, interpolated inside by the rank's position among the bin's values (geometrically for the
  log-spaced bins, linearly in the underflow bin), capped at absmax."""
  nb = hist.shape[-1]
  b = jnp.minimum(jnp.sum(cum <= rank[..., None], axis=-1), nb - 1)
  in_bin = jnp.take_along_axis(hist, b[..., None], axis=-1)[..., 0]
  before = jnp.take_along_axis(cum, b[..., None], axis=-1)[..., 0] - in_bin
  frac = jnp.clip((rank - before + 0.5) / jnp.maximum(in_bin, 1), 0.0, 1.0)
  lo = jnp.minimum(edges[b], absmax)
  hi = jnp.minimum(edges[b + 1], absmax)
  geometric = lo * jnp.power(jnp.maximum(hi, 1e-30) / jnp.maximum(lo, 1e-30), frac)
  return jnp.where(b == 0, lo + frac * (hi - lo), geometric)


def _hist_percentile(hist: jax.Array, absmax: jax.Array, spec: HistSpec, q: float) -> jax.Array:
  """The q-th percentile of the values binned in hist (..., NB) -> (...), with np.percentile's
  default ('linear') definition: rank r = q/100 * (n - 1), interpolated between the order statistics
  of ranks floor(r) and ceil(r), each estimated inside its bin (`_order_statistic`)."""
  if not 0.0 <= q <= 100.0:
    raise ValueError(f"percentile q={q} must be in [0, 100]")
  hist = jnp.asarray(hist)
  cum = jnp.cumsum(hist, axis=-1)
  n = cum[..., -1]
  rank = (q / 100.0) * jnp.maximum(n - 1, 0).astype(jnp.float32)
  lo_rank = jnp.floor(rank)
  edges = jnp.asarray(spec.edges(), jnp.float32)
  absmax = jnp.asarray(absmax, jnp.float32)
  v_lo = _order_statistic(hist, cum, absmax, edges, lo_rank)
  v_hi = _order_statistic(hist, cum, absmax, edges, jnp.ceil(rank))
  value = v_lo + (rank - lo_rank) * (v_hi - v_lo)
  return jnp.where(n > 0, jnp.minimum(value, absmax), 0.0)


def percentile(stats: ChannelStats, q: float) -> jax.Array:
  """The q-th percentile (0..100) of |x| per input channel over the whole stream -> (L, K) (or (K,)).

  Accurate to one histogram bin (a factor 2^(1 / spec.bins_per_octave)); q = 100 gives absmax.
  """
  if q == 100.0:
    return jnp.asarray(stats.absmax)
  return _hist_percentile(stats.hist, stats.absmax, stats.spec, q)


def token_percentile(stats: ChannelStats, q: float) -> jax.Array:
  """The q-th percentile of the per-token max |x| over the stream -> (L,) (or a scalar)."""
  return _hist_percentile(stats.token_hist, jnp.max(stats.absmax, axis=-1), stats.spec, q)


def mean_square(stats: ChannelStats) -> jax.Array:
  """E[x^2] per input channel -> (L, K) (or (K,))."""
  return stats.sum_sq / jnp.maximum(stats.count, 1).astype(jnp.float32)


def valid_samples(stats: ChannelStats) -> np.ndarray:
  """The filled reservoir rows as numpy -> (L, n, K) (or (n, K)), n = min(R, count)."""
  keep = np.isfinite(np.asarray(stats.sample_priority))
  return np.asarray(stats.samples)[..., keep, :]


def to_tree(stats: ChannelStats) -> dict[str, Any]:
  """Arrays only (for checkpoints): the static fields go to `spec` / `stacked` int32 arrays."""
  tree = {f: getattr(stats, f) for f in ("absmax", "sum_sq", "hist", "token_hist", "samples",
                                          "sample_priority", "count")}
  if stats.step_absmax is not None:
    tree["step_absmax"] = stats.step_absmax
  if stats.hessian is not None:
    tree["hessian"] = stats.hessian
  s = stats.spec
  tree["spec"] = np.array([s.min_exp, s.max_exp, s.bins_per_octave], np.int32)
  tree["stacked"] = np.array(int(stats.stacked), np.int32)
  return tree


def from_tree(tree: dict[str, Any]) -> ChannelStats:
  """Inverse of `to_tree`."""
  min_exp, max_exp, bpo = (int(v) for v in np.asarray(tree["spec"]))
  fields = {f: jnp.asarray(tree[f]) for f in ("absmax", "sum_sq", "hist", "token_hist", "samples",
                                              "sample_priority", "count")}
  step = tree.get("step_absmax")
  hessian = tree.get("hessian")
  return ChannelStats(**fields, step_absmax=None if step is None else jnp.asarray(step),
                      hessian=None if hessian is None else jnp.asarray(hessian),
                      spec=HistSpec(min_exp=min_exp, max_exp=max_exp, bins_per_octave=bpo),
                      stacked=bool(int(np.asarray(tree["stacked"]))))
