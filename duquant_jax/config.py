"""Quantization config: layer rules matched by regex on param paths, and named presets.

A `QuantConfig` holds an ordered tuple of `LayerRule`s. Each linear weight of the model (as declared
in `duquant_jax.layouts`) is matched against the rules' `pattern` with `re.fullmatch` on its
'/'-joined path (e.g. `PaliGemma/llm/layers/attn/q_einsum_1/w`); the first match wins. A weight that
matches no rule stays in floating point; `match_rules` reports rules that matched nothing and linear
layers that matched no rule. Rules follow qwix's style: frozen, keyword-only, validated on creation,
hashable (a config can be a static jit argument).

Token embedding tables are not linears: they are read by a gather, so they take an `EmbeddingRule`
(weight-only, row-wise int4 / int8; `duquant_jax.embedding`) in `QuantConfig.embeddings`, matched
the same way against the declared embedding paths (`duquant_jax.layouts.embedding_paths`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Literal

from duquant_jax import openpi_paths
from duquant_jax.openpi_paths import EXPERT_SUFFIX, EXPERTS, pattern

ROTATIONS = ("greedy", "random", "hadamard", "weight_svd", "weight_qr", "none")
PERMUTATIONS = ("zigzag", "head_zigzag", "none")
GRANULARITIES = ("channel", "head", "group")
ROUNDINGS = ("nearest", "gptq")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerRule:
  """How to quantize the linears whose path fully matches `pattern`."""

  pattern: str
  # Leave matched layers in floating point (a rule that shields layers from later rules).
  skip: bool = False
  # Weight bits, 2..8: 4 is W4; 6 or 8 for mixed precision. Codes are int4 up to 4 bits, else int8.
  # None: no weight quantization (the transformed weight is stored in float32); with act_bits=None
  # too, a transforms-only pack that equals the float model to float32 rounding (`transforms_only`).
  weight_bits: int | None = 4
  # Activation bits (8), or None for weight-only quantization (float activations).
  act_bits: int | None = 8
  # Quantize activations only in calls of at least this many tokens (M, batch included); smaller
  # calls multiply the same packed weights by the transformed float input, weight-only (more
  # precise; on the H100 faster at policy flow-step sizes, where the int8 quantizer costs more
  # kernels than int8 MMA saves: docs/design.md, "Thresholds in the code"). 0: always quantize.
  act_min_tokens: int = 0
  # DuQuant block size b of the input rotations (must divide the input width; within heads where
  # the input is head-structured, it must divide head_dim).
  block_size: int = 64
  # Input rotation: DuQuant's greedy activation-aware blocks, or a comparison method.
  rotation: Literal["greedy", "random", "hadamard", "weight_svd", "weight_qr", "none"] = "greedy"
  # Zigzag permutation between the two rotations; head_zigzag keeps channels inside their head.
  permutation: Literal["zigzag", "head_zigzag", "none"] = "zigzag"
  # Greedy rotation steps per block (DuQuant uses up to 256; a few already take most of the gain).
  rotation_steps: int = 16
  # Output-side block rotation of the weight, restored after the matmul ("restore"), or "off".
  output_rotation: Literal["off", "restore"] = "off"
  # SmoothQuant/DuQuant smoothing strength alpha, or None for no smoothing.
  smooth_alpha: float | None = 0.5
  # Weight scale granularity: per output channel, per attention head (output channels of one head
  # share a scale), or per group of `group_size` input channels.
  weight_granularity: Literal["channel", "head", "group"] = "channel"
  group_size: int = 128
  # Symmetric (no zero point) or asymmetric (zero point) weight / activation quantizers.
  weight_symmetric: bool = False
  act_symmetric: bool = False
  # Per-token activation clip ratio (1.0: no clipping).
  act_clip: float = 1.0
  # Activation scales: "token" computes each token's range at run time (a reduction over the
  # input per call); "static" fixes one scale (and zero point) per layer at packing, from the
  # calibration rows of the transformed input, so quantizing is elementwise and XLA fuses it into
  # the op producing the input. Tokens beyond the calibrated range are clipped.
  act_scale: Literal["token", "static"] = "token"
  # Static scales: the percentile of the calibration rows' per-token ranges that maps to the int8
  # range (99.9, as the source documents and QuantVLA use).
  act_percentile: float = 99.9
  # Search the weight clip ratio per output channel on `clip_grid`, minimising output MSE on
  # calibration activations (falls back to weight MSE without activation samples).
  clip_search: bool = True
  clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65)
  # Calibration rows the clip search's output MSE is measured on (its time grows linearly).
  clip_rows: int = 64
  # Narrow storage: weight scales float16, zero points int8 (integer-valued: exact), rotations int8
  # codes with float16 row scales (folded with their exact inverse), Hadamard blocks generated
  # instead of stored, permutations int16. Off: float32 scales and zero points, float16
  # rotations, as the openpi presets were measured (EVALUATION.md).
  compact: bool = False
  # How the int4 / int8 codes are chosen once the scales are fixed (by the clip search): "nearest"
  # rounds each weight; "gptq" rounds column by column and pushes each column's output error onto
  # the columns not yet rounded through the inverse Hessian of the transformed input
  # (`duquant_jax.gptq`). GPTQ needs the Hessian in the stats (`calibrate.hessian_for`).
  rounding: Literal["nearest", "gptq"] = "nearest"
  # GPTQ's dampening: this fraction of the mean Hessian diagonal is added to the diagonal.
  gptq_damp: float = 0.01
  # GPTQ's lazy-batch width (columns rounded before one matmul updates the rest).
  gptq_block: int = 128
  # GPTQ's act-order: round the input channels by descending Hessian diagonal instead of in
  # channel order (`gptq.act_order`); the codes are stored in channel order, so it costs nothing
  # at run time.
  gptq_act_order: bool = False
  # A rule for layers only some models have (pi0.5's adaptive-norm Dense layers): matching no
  # linear is then expected, and `quantize_params` does not warn about it.
  optional: bool = False

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"rule pattern {self.pattern!r} is not a valid regex: {e}") from None
    if self.weight_bits is not None and not 2 <= self.weight_bits <= 8:
      raise ValueError(f"rule {self.pattern!r}: weight_bits must be in 2..8, got {self.weight_bits}")
    if self.act_bits not in (None, 8):
      raise ValueError(f"rule {self.pattern!r}: act_bits must be 8 or None, got {self.act_bits}")
    if not isinstance(self.act_min_tokens, int) or self.act_min_tokens < 0:
      raise ValueError(f"rule {self.pattern!r}: act_min_tokens must be an int >= 0, got "
                       f"{self.act_min_tokens!r}")
    if self.act_bits is None and self.act_min_tokens:
      raise ValueError(f"rule {self.pattern!r}: act_min_tokens={self.act_min_tokens} needs act_bits "
                       "(a weight-only rule never quantizes activations)")
    if self.act_scale not in ("token", "static"):
      raise ValueError(f"rule {self.pattern!r}: act_scale must be 'token' or 'static', got "
                       f"{self.act_scale!r}")
    if self.act_scale == "static" and self.act_bits is None:
      raise ValueError(f"rule {self.pattern!r}: act_scale='static' needs act_bits (a weight-only "
                       "rule never quantizes activations)")
    if not 50.0 <= self.act_percentile <= 100.0:
      raise ValueError(f"rule {self.pattern!r}: act_percentile must be in [50, 100], got "
                       f"{self.act_percentile!r}")
    if self.rotation not in ROTATIONS:
      raise ValueError(f"rule {self.pattern!r}: unknown rotation {self.rotation!r}; one of {ROTATIONS}")
    if self.permutation not in PERMUTATIONS:
      raise ValueError(f"rule {self.pattern!r}: unknown permutation {self.permutation!r}; "
                       f"one of {PERMUTATIONS}")
    if self.output_rotation not in ("off", "restore"):
      raise ValueError(f"rule {self.pattern!r}: output_rotation must be 'off' or 'restore'")
    if self.weight_granularity not in GRANULARITIES:
      raise ValueError(f"rule {self.pattern!r}: unknown weight_granularity "
                       f"{self.weight_granularity!r}; one of {GRANULARITIES}")
    if not isinstance(self.clip_rows, int) or self.clip_rows < 1:
      raise ValueError(f"rule {self.pattern!r}: clip_rows must be an int >= 1, got {self.clip_rows!r}")
    if self.block_size < 1 or self.group_size < 1 or self.rotation_steps < 0:
      raise ValueError(f"rule {self.pattern!r}: block_size, group_size must be >= 1")
    if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
      raise ValueError(f"rule {self.pattern!r}: smooth_alpha must be in [0, 1] or None")
    if not 0.0 < self.act_clip <= 1.0 or not all(0.0 < c <= 1.0 for c in self.clip_grid):
      raise ValueError(f"rule {self.pattern!r}: clip ratios must be in (0, 1]")
    if self.rounding not in ROUNDINGS:
      raise ValueError(f"rule {self.pattern!r}: unknown rounding {self.rounding!r}; one of "
                       f"{ROUNDINGS}")
    if not 0.0 < self.gptq_damp <= 1.0:
      raise ValueError(f"rule {self.pattern!r}: gptq_damp must be in (0, 1], got {self.gptq_damp!r}")
    if not isinstance(self.gptq_act_order, bool):
      raise ValueError(f"rule {self.pattern!r}: gptq_act_order must be a bool, got "
                       f"{self.gptq_act_order!r}")
    if not isinstance(self.optional, bool):
      raise ValueError(f"rule {self.pattern!r}: optional must be a bool, got {self.optional!r}")
    if not isinstance(self.gptq_block, int) or self.gptq_block < 1:
      raise ValueError(f"rule {self.pattern!r}: gptq_block must be an int >= 1, got "
                       f"{self.gptq_block!r}")

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.pattern, path) is not None

  @property
  def transforms_input(self) -> bool:
    return self.rotation != "none" or self.permutation != "none" or self.smooth_alpha is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbeddingRule:
  """How to quantize the token embedding tables whose path fully matches `pattern` (weight-only)."""

  pattern: str
  # Code bits, 2..8: int4 storage up to 4 bits, else int8.
  bits: int = 4
  # Channels along D sharing a scale (must divide D), or None for one scale per row.
  group_size: int | None = 128
  # Symmetric codes (no zero point) or asymmetric (a zero point per scale).
  symmetric: bool = False
  # Storage of scales and zero points.
  scale_dtype: Literal["float16", "float32"] = "float16"
  # Clip ratios searched per (row, group) on the reconstruction error; (1.0,) is round-to-nearest.
  clip_grid: tuple[float, ...] = (1.0,)

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"embedding rule pattern {self.pattern!r} is not a valid regex: {e}") from None
    if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
      raise ValueError(f"embedding rule {self.pattern!r}: bits must be in 2..8, got {self.bits!r}")
    if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
      raise ValueError(f"embedding rule {self.pattern!r}: group_size must be a positive int or None "
                       f"(per row), got {self.group_size!r}")
    if self.scale_dtype not in ("float16", "float32"):
      raise ValueError(f"embedding rule {self.pattern!r}: scale_dtype must be 'float16' or "
                       f"'float32', got {self.scale_dtype!r}")
    if isinstance(self.clip_grid, list):
      object.__setattr__(self, "clip_grid", tuple(self.clip_grid))
    if not self.clip_grid or not all(0.0 < c <= 1.0 for c in self.clip_grid):
      raise ValueError(f"embedding rule {self.pattern!r}: clip ratios must be in (0, 1], got "
                       f"{self.clip_grid!r}")

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.pattern, path) is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionBalance:
  """Calibrated scalars folded into the attention weights of Gemma experts after packing
  (`duquant_jax.attention_balance`, following QuantVLA): they cost nothing at inference."""

  # Attention temperature matching: per layer and query head, q's output channels are scaled so
  # that the spread of the quantized policy's attention logits matches the FP policy's.
  temperature: bool = True
  # Output balancing: per layer, the attention output projection's output channels are scaled so
  # that its output energy matches the FP policy's (measured after the temperature fold).
  output: bool = True
  # The Gemma experts whose attention is balanced: 0 the LLM (its prefix pass), 1 the action
  # expert (its flow steps).
  experts: tuple[int, ...] = (1,)
  # How each scalar is fitted to the FP policy on the same inputs: "energy" matches the RMS
  # (QuantVLA's), "least_squares" minimises the squared difference to the FP values.
  fit: Literal["energy", "least_squares"] = "energy"
  # Flow steps per calibration batch, as in `sample_actions`.
  num_steps: int = 10

  def __post_init__(self):
    if isinstance(self.experts, (list, int)):
      object.__setattr__(self, "experts", tuple(
          [self.experts] if isinstance(self.experts, int) else self.experts))
    if not (self.temperature or self.output):
      raise ValueError("AttentionBalance: temperature and output are both off (use "
                       "attention_balance=None for no balancing)")
    if not self.experts or len(set(self.experts)) != len(self.experts) or not all(
        isinstance(e, int) and e >= 0 for e in self.experts):
      raise ValueError(f"AttentionBalance.experts must be distinct ints >= 0, got {self.experts!r}")
    if self.fit not in ("energy", "least_squares"):
      raise ValueError(f"AttentionBalance.fit must be 'energy' or 'least_squares', got {self.fit!r}")
    if not isinstance(self.num_steps, int) or self.num_steps < 1:
      raise ValueError(f"AttentionBalance.num_steps must be an int >= 1, got {self.num_steps!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """An ordered set of rules (first match wins) plus run-wide settings."""

  rules: tuple[LayerRule, ...] = ()
  # Rules for token embedding tables (first match wins; a table matching none stays float).
  embeddings: tuple[EmbeddingRule, ...] = ()
  name: str = "custom"
  # Seed of every random choice (rotations): the same inputs and seed give identical packs.
  seed: int = 0
  # Calibration batches this config was designed for (used by the CLI when it calibrates).
  calib_batches: int = 128
  # "int": real int4 / int8 storage and integer matmuls; "simulate": the same numerics in float.
  mode: Literal["int", "simulate"] = "int"
  # Fold orthogonal rotations into the weights before quantizing (exact in float; QuaRot's
  # computational invariance, `duquant_jax.model_rotation`): a randomized Hadamard rotation of the
  # residual stream of every Gemma expert with plain RMSNorm, and a random rotation of the
  # attention values per layer. Linears then read rotated inputs with no online transform.
  rotate_residual: bool = False
  # Shared-input groups of generic models: regexes with a named group `member`. Linears whose
  # paths fully match one and agree outside the `member` span read the same input (q, k and v of
  # one attention): they get one input transform, and one activation quantization per call.
  # openpi's groups are declared by their layouts (`duquant_jax.layouts`) and need none.
  shared_inputs: tuple[str, ...] = ()
  # Attention temperature matching and output balancing, or None. They need forward passes of the
  # FP and the packed policy, so `quantize_params` does not apply them: `balance_attention` does,
  # after it (as the CLI's convert, the demo and the evaluation harness do).
  attention_balance: AttentionBalance | None = None

  def __post_init__(self):
    if isinstance(self.rules, list):
      object.__setattr__(self, "rules", tuple(self.rules))
    if isinstance(self.embeddings, list):
      object.__setattr__(self, "embeddings", tuple(self.embeddings))
    if isinstance(self.shared_inputs, (list, str)):
      object.__setattr__(self, "shared_inputs", tuple(
          [self.shared_inputs] if isinstance(self.shared_inputs, str) else self.shared_inputs))
    for p in self.shared_inputs:
      try:
        rx = re.compile(p)
      except re.error as e:
        raise ValueError(f"shared_inputs pattern {p!r} is not a valid regex: {e}") from None
      if "member" not in rx.groupindex:
        raise ValueError(f"shared_inputs pattern {p!r} needs a named group (?P<member>...) marking "
                         "the part of the path that differs between the linears sharing an input")
    for r in self.rules:
      if not isinstance(r, LayerRule):
        raise TypeError(f"rules must be LayerRule instances, got {type(r).__name__}")
    for r in self.embeddings:
      if not isinstance(r, EmbeddingRule):
        raise TypeError(f"embeddings must be EmbeddingRule instances, got {type(r).__name__}")
    if self.mode not in ("int", "simulate"):
      raise ValueError(f"mode must be 'int' or 'simulate', got {self.mode!r}")
    if self.attention_balance is not None and not isinstance(self.attention_balance,
                                                             AttentionBalance):
      raise TypeError(f"attention_balance must be an AttentionBalance or None, got "
                      f"{type(self.attention_balance).__name__}")

  def rule_for(self, path: str) -> LayerRule | None:
    """The first rule matching `path` (None: no rule, or a skip rule)."""
    for r in self.rules:
      if r.matches(path):
        return None if r.skip else r
    return None

  def input_group(self, path: str) -> str | None:
    """The shared-input group of `path` (its path with the `member` span replaced by '*'), or None
    if no `shared_inputs` pattern matches it."""
    for p in self.shared_inputs:
      m = re.fullmatch(p, path)
      if m is not None and m.start("member") >= 0:
        return path[:m.start("member")] + "*" + path[m.end("member"):]
    return None

  def embedding_rule_for(self, path: str) -> EmbeddingRule | None:
    """The first embedding rule matching `path`, or None (the table stays in floating point)."""
    return next((r for r in self.embeddings if r.matches(path)), None)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "QuantConfig":
    d = dict(d)
    rules = []
    for r in d.pop("rules", ()):
      r = dict(r)
      if "clip_grid" in r:
        r["clip_grid"] = tuple(r["clip_grid"])
      unknown = set(r) - {f.name for f in dataclasses.fields(LayerRule)}
      if unknown:
        raise ValueError(f"unknown layer rule fields {sorted(unknown)} in rule {r.get('pattern')!r}")
      rules.append(LayerRule(**r))
    embeddings = []
    for r in d.pop("embeddings", ()):
      r = dict(r)
      unknown = set(r) - {f.name for f in dataclasses.fields(EmbeddingRule)}
      if unknown:
        raise ValueError(f"unknown embedding rule fields {sorted(unknown)} in rule "
                         f"{r.get('pattern')!r}")
      if "clip_grid" in r:
        r["clip_grid"] = tuple(r["clip_grid"])
      embeddings.append(EmbeddingRule(**r))
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown QuantConfig fields {sorted(unknown)}")
    if "shared_inputs" in d:
      d["shared_inputs"] = tuple(d["shared_inputs"])
    if d.get("attention_balance") is not None:
      ab = dict(d["attention_balance"])
      unknown = set(ab) - {f.name for f in dataclasses.fields(AttentionBalance)}
      if unknown:
        raise ValueError(f"unknown attention_balance fields {sorted(unknown)}")
      d["attention_balance"] = AttentionBalance(**ab)
    return cls(rules=tuple(rules), embeddings=tuple(embeddings), **d)


@dataclasses.dataclass(frozen=True)
class RuleReport:
  """Which linear layers each rule took, which rules took nothing, which layers no rule took."""

  matched: dict[str, list[str]]  # rule pattern -> layer paths (first match)
  unused_rules: list[str]  # rules that took no layer
  unmatched_layers: list[str]
  # Of `unused_rules`, those that match layers all taken by earlier rules -> the layers they match.
  shadowed_rules: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  # Rules marked `LayerRule.optional` (for layers only some models have).
  optional_rules: frozenset[str] = frozenset()

  def unused_lines(self) -> list[str]:
    """One line each for the rules that match nothing (optional ones apart) and those shadowed by
    earlier rules."""
    lines = []
    nothing = [p for p in self.unused_rules if p not in self.shadowed_rules]
    if required := [p for p in nothing if p not in self.optional_rules]:
      lines.append(f"rules that matched nothing: {required}")
    if optional := [p for p in nothing if p in self.optional_rules]:
      lines.append(f"optional rules that matched nothing (layers these params lack): {optional}")
    if self.shadowed_rules:
      lines.append("rules whose layers all match an earlier rule (the first match wins): "
                   f"{list(self.shadowed_rules)}")
    return lines

  def summary(self) -> str:
    lines = [f"{len(v):4d} layers  {k}" for k, v in self.matched.items()]
    lines += self.unused_lines()
    lines.append(f"{len(self.unmatched_layers)} linear layers matched no rule (kept in float)")
    return "\n".join(lines)


def match_rules(cfg: QuantConfig, linear_paths: Iterable[str]) -> RuleReport:
  linear_paths = list(linear_paths)
  matched: dict[str, list[str]] = {r.pattern: [] for r in cfg.rules}
  unmatched = []
  for path in linear_paths:
    for r in cfg.rules:
      if r.matches(path):
        matched[r.pattern].append(path)
        break
    else:
      unmatched.append(path)
  unused = [p for p, v in matched.items() if not v]
  shadowed = {}
  for r in cfg.rules:
    if r.pattern in unused and r.pattern not in shadowed:
      hits = [p for p in linear_paths if r.matches(p)]
      if hits:
        shadowed[r.pattern] = hits
  return RuleReport(matched=matched, unused_rules=unused, unmatched_layers=unmatched,
                    shadowed_rules=shadowed,
                    optional_rules=frozenset(r.pattern for r in cfg.rules if r.optional))


# ----------------------------------------------------------------------------------------------
# Presets. Layer groups by path, from the openpi path table (`duquant_jax.openpi_paths`):
_GEMMA = ("q", "kv", "attn_vec", "gating", "linear")
LLM = pattern(_GEMMA)
EXPERT_MLP = pattern(("gating", "linear"), (EXPERT_SUFFIX,))
EXPERT_ATTN = pattern(("q", "kv", "attn_vec"), (EXPERT_SUFFIX,))
EXPERT_QK = pattern(("q", "kv"), (EXPERT_SUFFIX,))
ATTN_PROJ = pattern(("q", "kv"), EXPERTS)
ATTN_OUT = pattern(("attn_vec",))  # the LLM's attention output projection
# SigLIP's transformer linears (q, k, v, out, MLP); the patch conv and the vision head stay float.
SIGLIP = pattern(("query", "key", "value", "out", "fc1", "fc2"))
EMBEDDING = openpi_paths.EMBEDDING
# pi0.5's adaptive-norm modulation Dense layers (the expert's RMSNorms conditioned on time).
ADARMS = (r"PaliGemma/llm/(layers/)?(" + "|".join(
    f"{n}{EXPERT_SUFFIX}" for n in ("pre_attention_norm", "pre_ffw_norm", "final_norm"))
    + rf")/{openpi_paths.ADARMS_DENSE}/kernel")


# Generic models: every flax Dense / DenseGeneral / Einsum kernel, root-level included (kernels of
# more than two axes with their calibration stats, which measure the contraction).
GENERIC_KERNEL = r"(.*/)?kernel"
# q / k / v of an attention, and gate / up of a gated MLP, under the names common flax models use.
SHARED_INPUTS = (
    r".*/(?P<member>query|key|value|q|k|v|q_proj|k_proj|v_proj)/kernel",
    r".*/(?P<member>gate_proj|up_proj|wi_0|wi_1)/kernel",
)


def generic_config(*, name: str = "generic-w4a8", skip: tuple[str, ...] = (),
                   shared_inputs: tuple[str, ...] = SHARED_INPUTS, **rule) -> QuantConfig:
  """A config for any flax model: one rule for every Dense / DenseGeneral / Einsum kernel.

  Args:
    name: the config's name.
    skip: path regexes of kernels to keep in floating point (e.g. a classifier head); they are
      matched before the generic rule.
    shared_inputs: `QuantConfig.shared_inputs` (default: q / k / v and gate / up by common names).
    **rule: `LayerRule` fields for the quantized kernels; the default is `recommended`'s DuQuant
      W4A8 at block 16 (greedy rotations, zigzag, smoothing, asymmetric quantizers, clip search)
      with `compact` storage.

  Returns:
    The QuantConfig.

  Example:
    cfg = generic_config(skip=(r"classifier/.*",), block_size=32)
  """
  fields = dict(block_size=16, compact=True)
  fields.update(rule)
  return QuantConfig(name=name, shared_inputs=tuple(shared_inputs), rules=(
      *(LayerRule(pattern=p, skip=True) for p in skip),
      LayerRule(pattern=GENERIC_KERNEL, **fields)))


def transforms_only(cfg: QuantConfig) -> QuantConfig:
  """`cfg` with quantization off: every rule keeps its transforms (smoothing, rotations,
  permutation, output rotation) but stores float32 weights and leaves activations float, so the
  packed model equals the float one to float32 rounding (a check of the folds); embedding rules
  are dropped."""
  off = dict(weight_bits=None, act_bits=None, act_scale="token", act_min_tokens=0)
  return dataclasses.replace(cfg, name=f"{cfg.name}-transforms-only", embeddings=(), rules=tuple(
      r if r.skip else dataclasses.replace(r, **off) for r in cfg.rules))


def _documents(block: int, calib: int, name: str, **kw) -> QuantConfig:
  """The source documents' runs: LLM + expert MLP, symmetric quantizers, weight clip off, and the
  output rotation restored after the matmul (their ROW_ROT=restore), with DuQuant's greedy
  rotations (their weight-based rotations are the `rotation=` variants in the evaluation)."""
  rule = dict(block_size=block, weight_symmetric=True, act_symmetric=True, clip_search=False,
              output_rotation="restore", **kw)
  return QuantConfig(name=name, calib_batches=calib, rules=(
      LayerRule(pattern=LLM, **rule), LayerRule(pattern=EXPERT_MLP, **rule)))


def _ours(name: str, rules: tuple[LayerRule, ...], calib: int = 128) -> QuantConfig:
  return QuantConfig(name=name, calib_batches=calib, rules=rules)


# Flow-step calls of the action expert have 51 tokens per observation. On the H100 (docs/design.md,
# "Thresholds in the code") its MLP ran faster weight-only at batch 1 (51 tokens: 40.7 vs 42.1 ms
# per call) and slower at batch 4 (204 tokens: 94.3 vs 86.9 ms); so under `deploy` batch 1 runs it weight-only.
DEPLOY_EXPERT_ACT_MIN_TOKENS = 64


def _presets() -> dict[str, QuantConfig]:
  ours = dict(block_size=64)  # asymmetric int4 weights with clip search, asymmetric int8 acts
  rtn = dict(rotation="none", permutation="none", smooth_alpha=None, weight_symmetric=True,
             act_symmetric=True, clip_search=False)
  # Measured on the demo models (EVALUATION.md): block 16 with asymmetric quantizers and clip search
  # gave the lowest action error and the fewest transform bytes.
  best = dict(block_size=16)
  # GPTQ rounding after the transform takes 33-41% off `recommended`'s and 32-40% off `fast`'s demo
  # action error (EVALUATION.md, "GPTQ rounding"); calibration must then keep the Hessians
  # (`calibrate.hessian_for`). Act-order (the columns by descending Hessian diagonal; no run-time
  # cost) lowers every preset's layer error by 10-17% on the demo (EVALUATION.md, "GPTQ
  # act-order").
  gptq = dict(rounding="gptq", gptq_act_order=True)
  plain = dict(rotation="none", permutation="none")
  # Static symmetric int8 activations: the demo's action error is that of asymmetric ones within
  # its noise (EVALUATION.md, "The `fast` preset"), and the kernels skip the weight code sums.
  static = dict(act_scale="static", act_symmetric=True)
  weight_only = dict(act_bits=None, smooth_alpha=None)
  # `fast`'s LLM and expert-attention rules, shared with `fast-accurate`.
  fast_llm = (LayerRule(pattern=ATTN_OUT, smooth_alpha=None, **static, **plain, **gptq),
              LayerRule(pattern=LLM, **static, **plain, **gptq))
  fast_expert_attn = LayerRule(pattern=EXPERT_ATTN, weight_bits=8, **weight_only, **plain, **gptq)
  return {
      "fp": QuantConfig(name="fp", rules=()),
      "w4a8-b16-c32": _documents(16, 32, "w4a8-b16-c32"),
      "w4a8-b16-c128": _documents(16, 128, "w4a8-b16-c128"),
      "w4a8-b64-c128": _documents(64, 128, "w4a8-b64-c128"),
      "w4a8-b64-c128-perhead": QuantConfig(name="w4a8-b64-c128-perhead", calib_batches=128, rules=(
          LayerRule(pattern=ATTN_PROJ, weight_granularity="head", block_size=64,
                    weight_symmetric=True, act_symmetric=True, clip_search=False,
                    output_rotation="restore"),
          *_documents(64, 128, "x").rules)),
      "w4a8-mixed": _ours("w4a8-mixed", (
          LayerRule(pattern=EXPERT_QK, weight_bits=6, **ours),
          LayerRule(pattern=LLM, **ours), LayerRule(pattern=EXPERT_MLP, **ours),
          LayerRule(pattern=EXPERT_ATTN, **ours))),
      "w4a8-llm-only": _ours("w4a8-llm-only", (LayerRule(pattern=LLM, **ours),)),
      "w4a8-full": _ours("w4a8-full", (
          LayerRule(pattern=LLM, **ours), LayerRule(pattern=EXPERT_MLP, **ours),
          LayerRule(pattern=EXPERT_ATTN, **ours))),
      "w4a8-rtn": _ours("w4a8-rtn", (LayerRule(pattern=LLM, **rtn),
                                     LayerRule(pattern=EXPERT_MLP, **rtn))),
      "recommended": _ours("recommended", (LayerRule(pattern=LLM, **best, **gptq),
                                           LayerRule(pattern=EXPERT_MLP, **best, **gptq))),
      # Every Gemma linear at W4A8, the action expert's attention too: with GPTQ its demo action
      # error equals `recommended`'s (EVALUATION.md, "Attention balancing"), for smaller weights.
      "recommended-all": _ours("recommended-all", (
          LayerRule(pattern=LLM, **best, **gptq), LayerRule(pattern=EXPERT_MLP, **best, **gptq),
          LayerRule(pattern=EXPERT_ATTN, **best, **gptq))),
      # All weights at <= 0.30x bf16 (full size, EVALUATION.md): recommended, plus the expert
      # attention weight-only W8 with no transform (small; W4 cost more action error on the demo,
      # and W8A8 with DuQuant's transform measured the same error but runs an online transform per
      # flow step), SigLIP at W4 behind DuQuant's b8 transform (block 8 divides SigLIP's head_dim
      # 72, width 1152 and MLP width 4304; it measured better than block 16, RTN, or W8 MLP on the
      # demo), weight-only: the same action error as W4A8 there and 2.3 ms less prefix on the H100
      # (no activation quantizer, a bf16 GEMM; docs/journal.md, "weight-only SigLIP"), and the
      # token table weight-only int4. The expert MLP quantizes its activations only from
      # DEPLOY_EXPERT_ACT_MIN_TOKENS tokens per call: below, the same packed weights run
      # weight-only (H100: batch-1 flow steps faster, docs/design.md "Thresholds in the code";
      # the demo's action error unchanged, EVALUATION.md).
      # Nothing online (docs/design.md, "The fast design"): the residual streams and attention
      # values rotated with rotations folded into the weights (`rotate_residual`; the linears
      # reading a rotated stream skip smoothing), the down projection's smoothing folded into the
      # up projection, and static int8 activation scales, so every quantizer is an elementwise op
      # fused into its producer. The expert attention W8 weight-only and the token table int4 as
      # `deploy`; SigLIP W4 weight-only with no transform.
      "fast": QuantConfig(name="fast", calib_batches=128, rotate_residual=True, rules=(
          *fast_llm, LayerRule(pattern=EXPERT_MLP, **static, **plain, **gptq), fast_expert_attn,
          LayerRule(pattern=SIGLIP, **weight_only, **plain, **gptq)),
          embeddings=(EmbeddingRule(pattern=EMBEDDING, bits=4, group_size=128),)),
      # `fast` with W8 weights where its demo error comes from, inside 0.30x of the bf16 weights
      # (EVALUATION.md, "The token embedding at 2 bits"): SigLIP weight-only W8 and the expert MLP
      # W8A8 (static symmetric int8 activations), pi0.5's adaptive-norm Dense layers weight-only
      # W8, and the token table at 2 bits, four codes to a byte, with a clip search per group
      # (only its 48 prompt rows per call are read). Nothing online, as `fast`. The W8 adaptive-norm
      # and expert-MLP rules round with GPTQ in channel order: the rules that were measured.
      "fast-accurate": QuantConfig(
          name="fast-accurate", calib_batches=128, rotate_residual=True, rules=(
              LayerRule(pattern=ADARMS, weight_bits=8, **weight_only, optional=True, **plain,
                        rounding="gptq"),
              LayerRule(pattern=EXPERT_MLP, weight_bits=8, **static, **plain, rounding="gptq"),
              *fast_llm, fast_expert_attn,
              LayerRule(pattern=SIGLIP, weight_bits=8, **weight_only, **plain, **gptq)),
          embeddings=(EmbeddingRule(pattern=EMBEDDING, bits=2, group_size=128,
                                    clip_grid=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)),)),
      # Any flax model: every Dense / DenseGeneral / Einsum kernel at `recommended`'s settings,
      # q / k / v and gate / up sharing their input by common names (`generic_config`).
      "generic-w4a8": generic_config(),
      "deploy": QuantConfig(name="deploy", calib_batches=128, rules=(
          LayerRule(pattern=LLM, **best),
          LayerRule(pattern=EXPERT_MLP, act_min_tokens=DEPLOY_EXPERT_ACT_MIN_TOKENS, **best),
          LayerRule(pattern=EXPERT_ATTN, weight_bits=8, act_bits=None, rotation="none",
                    permutation="none", smooth_alpha=None),
          LayerRule(pattern=SIGLIP, block_size=8, act_bits=None)),
          embeddings=(EmbeddingRule(pattern=EMBEDDING, bits=4, group_size=128),)),
  }


PRESETS: dict[str, QuantConfig] = _presets()


def get_preset(name: str) -> QuantConfig:
  """The named preset; ValueError listing the known names otherwise."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
  return PRESETS[name]
