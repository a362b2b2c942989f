"""Candidate quantization configs for `deploy`, by short key: measured for accuracy on the demo
(`compare_deploy_candidates.py`, EVALUATION.md) and for speed on the GPU (`bench_policy.py
--presets`, BENCHMARKS.md). Keys not listed in EVALUATION.md are exploratory.
"""
import dataclasses

from duquant_jax.config import (ADARMS, EMBEDDING, EXPERT_ATTN, EXPERT_MLP, LLM, SIGLIP,
                                AttentionBalance, EmbeddingRule, LayerRule, QuantConfig,
                                get_preset, PRESETS)
from duquant_jax.openpi_paths import EXPERTS, pattern

EMB = EmbeddingRule(pattern=EMBEDDING)
SIG = SIGLIP
SIG_ATT = pattern(("query", "key", "value", "out"))
SIG_MLP = pattern(("fc1", "fc2"))
SIG_OUT = pattern(("out",))
HEAD = r"PaliGemma/img/head/kernel"
SIG_FC1 = pattern(("fc1",))
SIG_FC2 = pattern(("fc2",))
best = dict(block_size=16)
rtn = dict(rotation="none", permutation="none", smooth_alpha=None)
base = (LayerRule(pattern=LLM, **best), LayerRule(pattern=EXPERT_MLP, **best))
ea = (LayerRule(pattern=EXPERT_ATTN, **best),)
def _fast(name, *, down=None, sig=None, eattn=None, **rule_kw):
  """`fast` with its W4A8 rules changed by `rule_kw`, an extra rule for the down projections
  (LayerRule fields, taking precedence), or another SigLIP / expert-attention rule (`_with`
  puts any other rule first)."""
  fast = get_preset("fast")
  rules = [dataclasses.replace(r, **rule_kw) if r.act_bits else r for r in fast.rules]
  if sig is not None:
    rules[-1] = sig
  if eattn is not None:
    rules[-2] = eattn
  if down is not None:
    rules.insert(0, LayerRule(pattern=pattern(("linear",), EXPERTS),
                              act_scale="static", **down))
  return dataclasses.replace(fast, name=name, rules=tuple(rules))


def C(name, rules, emb=(EMB,)):
  return QuantConfig(name=name, rules=tuple(rules), embeddings=emb)
CANDIDATES = {
 "rec": get_preset("recommended"),
 "emb": C("rec+emb", base),
 "ea": C("rec+emb+eattn", base + ea),
 "sig8": C("+sig dq b8", base + ea + (LayerRule(pattern=SIG, block_size=8),)),
 "sigrtn": C("+sig rtn+clip", base + ea + (LayerRule(pattern=SIG, **rtn),)),
 "sigw8": C("+sig w8a8 rtn", base + ea + (LayerRule(pattern=SIG, weight_bits=8, **rtn),)),
 "sigb16o8": C("+sig b16 out b8", base + ea + (LayerRule(pattern=SIG_OUT, block_size=8), LayerRule(pattern=SIG, block_size=16))),
 "sigmixA": C("+sig attn b8 w4, mlp w8 rtn", base + ea + (LayerRule(pattern=SIG_ATT, block_size=8), LayerRule(pattern=SIG_MLP, weight_bits=8, **rtn))),
 "sigmixM": C("+sig attn w8 rtn, mlp b8 w4", base + ea + (LayerRule(pattern=SIG_ATT, weight_bits=8, **rtn), LayerRule(pattern=SIG_MLP, block_size=8))),
 "ea8sig8": C("eattn w8 b16, sig b8", base + (LayerRule(pattern=EXPERT_ATTN, weight_bits=8, **best),) + (LayerRule(pattern=SIG, block_size=8),)),
 "sig8g": C("+sig b8 group64", base + ea + (LayerRule(pattern=SIG, block_size=8, weight_granularity="group", group_size=64),)),
 "sig8sm": C("+sig smooth-only", base + ea + (LayerRule(pattern=SIG, rotation="none", permutation="none", block_size=8),)),
 "sig8h": C("+sig b8 +head", base + ea + (LayerRule(pattern=SIG, block_size=8), LayerRule(pattern=HEAD, block_size=8))),
 # Weight-only (no activation quantization, no online transform) for SigLIP and / or the expert
 # attention: the same bytes as `deploy`, without its per-call transforms.
 "sigwo": C("+sig w4a16 rtn+clip", base + (LayerRule(pattern=EXPERT_ATTN, weight_bits=8, **best),) + (LayerRule(pattern=SIG, act_bits=None, **rtn),)),
 "eawo": C("eattn w8a16 rtn, sig b8", base + (LayerRule(pattern=EXPERT_ATTN, weight_bits=8, act_bits=None, **rtn),) + (LayerRule(pattern=SIG, block_size=8),)),
 "wo": C("eattn w8a16 rtn, sig w4a16 rtn+clip", base + (LayerRule(pattern=EXPERT_ATTN, weight_bits=8, act_bits=None, **rtn),) + (LayerRule(pattern=SIG, act_bits=None, **rtn),)),
 # Ablations of `deploy` (its pieces one at a time on top of recommended):
 "ea8": C("rec+emb+eattn w8", base + (LayerRule(pattern=EXPERT_ATTN, weight_bits=8, **best),)),
 "recsig8": C("rec+sig b8", base + (LayerRule(pattern=SIG, block_size=8),), emb=()),
 "receattn8": C("rec+eattn w8", base + (LayerRule(pattern=EXPERT_ATTN, weight_bits=8, **best),), emb=()),
 # `deploy` itself, and `deploy` with the expert MLP weight-only W4 (no online transform per flow
 # step; at M = 51 tokens int8 activations buy no tensor-core time, BENCHMARKS.md).
 "deploy": get_preset("deploy"),
 "emwo": C("deploy, expert mlp w4a16 rtn+clip", (LayerRule(pattern=LLM, **best),) + (LayerRule(pattern=EXPERT_MLP, act_bits=None, **rtn),) + get_preset("deploy").rules[2:]),
 "emwog": C("deploy, expert mlp w4a16 g128 rtn+clip", (LayerRule(pattern=LLM, **best),) + (LayerRule(pattern=EXPERT_MLP, act_bits=None, weight_granularity="group", group_size=128, **rtn),) + get_preset("deploy").rules[2:]),
 # SigLIP's attention weight-only W8 (no online transform; MLP stays W4A8 b8) or all of SigLIP
 # weight-only W8, each with pi0.5's adaRMS modulation Dense weight-only W8 (bytes for the former).
 "dmod": C("deploy + adarms w8a16", get_preset("deploy").rules + (LayerRule(pattern=ADARMS, weight_bits=8, act_bits=None, **rtn),)),
 "dsa8": C("deploy, sig attn w8a16, adarms w8a16", get_preset("deploy").rules[:3] + (LayerRule(pattern=SIG_ATT, weight_bits=8, act_bits=None, **rtn), LayerRule(pattern=SIG_MLP, block_size=8), LayerRule(pattern=ADARMS, weight_bits=8, act_bits=None, **rtn))),
 "dsw8": C("deploy, sig w8a16, adarms w8a16", get_preset("deploy").rules[:3] + (LayerRule(pattern=SIG, weight_bits=8, act_bits=None, **rtn), LayerRule(pattern=ADARMS, weight_bits=8, act_bits=None, **rtn))),
 "dsf1": C("deploy, sig w8a16 but fc1 w4a8 b8, adarms w8a16", get_preset("deploy").rules[:3] + (LayerRule(pattern=SIG_FC1, block_size=8), LayerRule(pattern=SIG, weight_bits=8, act_bits=None, **rtn), LayerRule(pattern=ADARMS, weight_bits=8, act_bits=None, **rtn))),
 # SigLIP weight-only W4 WITH DuQuant's b8 rotations (no activation quantizer: the transformed
 # input goes to a bf16 GEMM), without / with smoothing.
 "sigwo8": C("deploy, sig w4a16 b8 rotations", get_preset("deploy").rules[:3] + (LayerRule(pattern=SIG, block_size=8, act_bits=None, smooth_alpha=None),)),
 "sigwo8s": C("deploy, sig w4a16 b8 rotations + smoothing", get_preset("deploy").rules[:3] + (LayerRule(pattern=SIG, block_size=8, act_bits=None),)),
 # The expert MLP and / or the LLM weight-only W4 behind the same b16 DuQuant transform (as
 # `deploy`'s SigLIP): no activation quantizer, the rotated input goes to a bf16 GEMM.
 "emwot": C("deploy, expert mlp w4a16 b16 transform", (LayerRule(pattern=LLM, **best), LayerRule(pattern=EXPERT_MLP, act_bits=None, **best)) + get_preset("deploy").rules[2:]),
 "llmwot": C("deploy, llm w4a16 b16 transform", (LayerRule(pattern=LLM, act_bits=None, **best), LayerRule(pattern=EXPERT_MLP, **best)) + get_preset("deploy").rules[2:]),
 "allwot": C("deploy, llm + expert mlp w4a16 b16 transform", (LayerRule(pattern=LLM, act_bits=None, **best), LayerRule(pattern=EXPERT_MLP, act_bits=None, **best)) + get_preset("deploy").rules[2:]),
 # `deploy` with the expert MLP W4A8 at every call size (no `act_min_tokens`).
 "deploya8": C("deploy, expert mlp w4a8 always", (LayerRule(pattern=LLM, **best), LayerRule(pattern=EXPERT_MLP, **best)) + get_preset("deploy").rules[2:]),
 "emw8": C("deploy, expert mlp w8a16 rtn+clip", (LayerRule(pattern=LLM, **best),) + (LayerRule(pattern=EXPERT_MLP, weight_bits=8, act_bits=None, **rtn),) + get_preset("deploy").rules[2:]),
  # The `fast` design's levers one at a time (docs/design.md, "The fast design"; EVALUATION.md).
 "fasttok": _fast("fast, per-token activation scales", act_scale="token"),
 "fastnorot": dataclasses.replace(_fast("fast without rotate_residual"), rotate_residual=False),
 "fastsig8": _fast("fast, SigLIP as deploy (b8 rotations online)", sig=get_preset("deploy").rules[3]),
 "fastdown": _fast("fast + DuQuant b16 online on the down projections", down=dict(block_size=16)),
 "fast2h": _fast("fast + Hadamard b64 online on the down projections",
                 down=dict(block_size=64, rotation="hadamard", permutation="none")),
 "fast64g": _fast("fast + one greedy b64 rotation online on the down projections",
                  down=dict(block_size=64, permutation="none")),
 # The same online down-projection transforms with GPTQ rounding, as `fast` rounds every rule.
 "fast2hq": _fast("fast + Hadamard b64 online on the down projections, GPTQ",
                  down=dict(block_size=64, rotation="hadamard", permutation="none", rounding="gptq")),
 "fast64gq": _fast("fast + one greedy b64 rotation online on the down projections, GPTQ",
                   down=dict(block_size=64, permutation="none", rounding="gptq")),
 "fastdownq": _fast("fast + DuQuant b16 online on the down projections, GPTQ",
                    down=dict(block_size=16, rounding="gptq")),
 # Where `fast`'s error comes from: its SigLIP, or its expert attention, kept float.
 "fastsigfp": _fast("fast, SigLIP float", sig=LayerRule(pattern=SIG, skip=True)),
 "fasteafp": _fast("fast, expert attention float", eattn=LayerRule(pattern=EXPERT_ATTN, skip=True)),
 "fastsig8w": _fast("fast, SigLIP W8 weight-only", sig=dataclasses.replace(
     get_preset("fast").rules[-1], weight_bits=8)),
 # `fast` quantizes its activations symmetrically; asymmetric ones make the kernels sum the
 # weight codes too. Symmetric weights would spare them the token rows' sums.
 "fastasym": _fast("fast, asymmetric activations", act_symmetric=False),
 "fastsymw": _fast("fast, symmetric int4 weights", weight_symmetric=True),
 "fastg": _fast("fast, down projections' weights per group of 128",
                down=dict(rotation="none", permutation="none", weight_granularity="group")),
 "fasta8": _fast("fast, expert attention W8A8 static", eattn=LayerRule(
     pattern=EXPERT_ATTN, weight_bits=8, act_scale="static", rotation="none", permutation="none",
     smooth_alpha=None)),
}


def resolve(name: str) -> QuantConfig:
  """A preset name (`config.PRESETS`) or a candidate key of this module."""
  if name in PRESETS:
    return get_preset(name)
  if name in CANDIDATES:
    return CANDIDATES[name]
  raise SystemExit(f"unknown preset / candidate {name!r}; presets: {', '.join(PRESETS)}; "
                   f"candidates: {', '.join(CANDIDATES)}")



def _with(key: str, name: str, *rules: LayerRule) -> QuantConfig:
  """Candidate `key` with `rules` first (they take precedence)."""
  cfg = resolve(key)
  return dataclasses.replace(cfg, name=name, rules=rules + cfg.rules)


_W8 = dict(weight_bits=8, rotation="none", permutation="none", rounding="gptq")
# The expert's down projection W8A8 (GPTQ and symmetric static activations, as `fast`'s rules).
_EXPERT_DOWN8 = LayerRule(pattern=pattern(("linear",), ("_1",)), act_scale="static",
                          act_symmetric=True, **_W8)
CANDIDATES.update({
    "fastw8down": _with("fast", "fast, expert down projection W8", LayerRule(
        pattern=pattern(("linear",), ("_1",)), weight_bits=8, act_scale="static",
        rotation="none", permutation="none")),
    # Toward `fast` within 10% of `recommended` on pi0: SigLIP W8 weight-only, and the expert's
    # down projections W8 too.
    "fastsig8wd8": _with("fastsig8w", "fast, SigLIP W8 weight-only, expert down W8",
                         _EXPERT_DOWN8),
    "fastd8": _with("fast", "fast, expert down W8", _EXPERT_DOWN8),
    "fastw8exp": _with("fast", "fast, expert MLP W8A8", LayerRule(
        pattern=EXPERT_MLP, weight_bits=8, act_scale="static", rotation="none",
        permutation="none")),
})


def rounded(cfg: QuantConfig, rounding: str, name: str | None = None) -> QuantConfig:
  """`cfg` with `LayerRule.rounding` set on every quantizing rule ("nearest" or "gptq")."""
  rules = tuple(r if r.skip else dataclasses.replace(r, rounding=rounding) for r in cfg.rules)
  return dataclasses.replace(cfg, name=name or f"{cfg.name}+{rounding}", rules=rules)


# GPTQ rounding (EVALUATION.md, "GPTQ rounding"). `recommended` and `fast` round with GPTQ;
# `*nearest` are them rounding to nearest, `*gptq` the same configs as the presets. Every Gemma
# linear at W4A8 (the expert attention too, as `recommended`'s b16 DuQuant), with either rounding.
CANDIDATES.update({
    "recnearest": rounded(get_preset("recommended"), "nearest"),
    "recgptq": rounded(get_preset("recommended"), "gptq"),
    "fastnearest": rounded(get_preset("fast"), "nearest"),
    "fastgptq": rounded(get_preset("fast"), "gptq"),
    "deploygptq": rounded(get_preset("deploy"), "gptq"),
    "recea": C("recommended + expert attention W4A8 b16", base + ea, emb=()),
    "receagptq": rounded(C("recommended + expert attention W4A8 b16", base + ea, emb=()), "gptq"),
})


def balanced(cfg: QuantConfig, name: str, **fields) -> QuantConfig:
  """`cfg` with attention balancing (`config.AttentionBalance` fields; default both levers on the
  action expert)."""
  return dataclasses.replace(cfg, name=name, attention_balance=AttentionBalance(**fields))


# Attention temperature matching and output balancing (EVALUATION.md, "Attention balancing")
# on every Gemma linear at W4A8 with GPTQ (`receagptq`), and on `recommended`.
_ALL = CANDIDATES["receagptq"]
CANDIDATES.update({
    "receagptqT": balanced(_ALL, "every Gemma linear W4A8 + temperature", output=False),
    "receagptqO": balanced(_ALL, "every Gemma linear W4A8 + output balance", temperature=False),
    "receagptqTO": balanced(_ALL, "every Gemma linear W4A8 + temperature + output balance"),
    "receagptqTOls": balanced(_ALL, "every Gemma linear W4A8 + both, least squares",
                              fit="least_squares"),
    "receagptqTOllm": balanced(_ALL, "every Gemma linear W4A8 + both, LLM too", experts=(0, 1)),
    "recTO": balanced(get_preset("recommended"), "recommended + temperature + output balance"),
    # The same levers where the expert attention's error is larger (round to nearest).
    "receaT": balanced(CANDIDATES["recea"], "every Gemma linear W4A8, nearest + temperature",
                       output=False),
    "receaO": balanced(CANDIDATES["recea"], "every Gemma linear W4A8, nearest + output balance",
                       temperature=False),
    "receaTO": balanced(CANDIDATES["recea"], "every Gemma linear W4A8, nearest + both"),
})


# pi0.5 toward `fast` within 10% of `recommended` at <= 0.30x: its adaptive-norm Dense layers
# weight-only W8 (bf16 in `fast`; they make room for W8 elsewhere), its expert gate / up W8 (its
# stream cannot be rotated offline, "Where `fast`'s error comes from").
_ADARMS8 = LayerRule(pattern=ADARMS, act_bits=None, smooth_alpha=None, **_W8)
_EXPERT_GU8 = LayerRule(pattern=pattern(("gating",), ("_1",)), act_scale="static",
                        act_symmetric=True, **_W8)
CANDIDATES.update({
    "fastm8": _with("fast", "fast, adaRMS W8 weight-only", _ADARMS8),
    "fastd8m8": _with("fastd8", "fast, expert down W8, adaRMS W8", _ADARMS8),
    "fastsig8wd8m8": _with("fastsig8wd8", "fast, SigLIP W8 wo, expert down W8, adaRMS W8",
                           _ADARMS8),
    "fastmlp8m8": _with("fastd8", "fast, expert MLP W8, adaRMS W8", _ADARMS8, _EXPERT_GU8),
    "fastsig8wmlp8m8": _with("fastsig8wd8", "fast, SigLIP W8 wo, expert MLP W8, adaRMS W8",
                             _ADARMS8, _EXPERT_GU8),
})
# Only part of SigLIP at W8 (weight-only, GPTQ as `fast`'s SigLIP rule), to fit 0.30x with the
# expert MLP at W8 on both models.
_SIG_RULE = get_preset("fast").rules[-1]
CANDIDATES.update({
    "fastsa8mlp8m8": _with("fastmlp8m8", "fast, SigLIP attention W8 wo, expert MLP W8, adaRMS W8",
                           dataclasses.replace(_SIG_RULE, pattern=SIG_ATT, weight_bits=8)),
    "fastsf18mlp8m8": _with("fastmlp8m8", "fast, SigLIP fc1 W8 wo, expert MLP W8, adaRMS W8",
                            dataclasses.replace(_SIG_RULE, pattern=SIG_FC1, weight_bits=8)),
})
# The expert MLP at W4 with a scale per group of input channels (GPTQ), in place of W8.
_EXPERT_MLP_G = lambda g: LayerRule(  # noqa: E731
    pattern=EXPERT_MLP, weight_granularity="group", group_size=g, act_scale="static",
    act_symmetric=True, rotation="none", permutation="none", rounding="gptq")
CANDIDATES.update({
    f"fastmlpg{g}m8": _with("fastm8", f"fast, expert MLP W4 groups of {g}, adaRMS W8",
                            _EXPERT_MLP_G(g)) for g in (64, 128)})
# pi0.5's expert stream cannot be rotated offline (adaptive norm): a block-64 Hadamard rotation
# of the expert gate / up input, online.
_H64 = dict(block_size=64, rotation="hadamard", permutation="none", act_scale="static",
            act_symmetric=True, rounding="gptq")
CANDIDATES.update({
    "fastgu2hm8": _with("fastm8", "fast, expert gate/up Hadamard b64 online, adaRMS W8",
                        LayerRule(pattern=pattern(("gating",), ("_1",)), **_H64)),
    "fastmlp2hm8": _with("fastm8", "fast, expert MLP Hadamard b64 online, adaRMS W8",
                         LayerRule(pattern=EXPERT_MLP, **_H64)),
})
_EXPERT_DOWN_H64 = LayerRule(pattern=pattern(("linear",), ("_1",)), **_H64)
_SA8 = dataclasses.replace(_SIG_RULE, pattern=SIG_ATT, weight_bits=8)
CANDIDATES.update({
    "fastd2hm8": _with("fastm8", "fast, expert down Hadamard b64 online, adaRMS W8",
                       _EXPERT_DOWN_H64),
    "fastsa8d2hm8": _with("fastm8", "fast, SigLIP attention W8 wo, expert down Hadamard b64 "
                          "online, adaRMS W8", _SA8, _EXPERT_DOWN_H64),
    "fastsa8mlp8d2hm8": _with("fastsa8mlp8m8", "fast, SigLIP attention W8 wo, expert MLP W8, "
                              "down Hadamard b64 online, adaRMS W8",
                              dataclasses.replace(_EXPERT_DOWN_H64, weight_bits=8)),
})
# What costs no flow-step time: SigLIP's attention W8 weight-only (prefix only) and pi0.5's
# adaptive-norm Dense layers W8 weight-only (a GEMV per layer and flow step, half the bytes).
CANDIDATES["fastsa8m8"] = _with("fastm8", "fast, SigLIP attention W8 wo, adaRMS W8", _SA8)
# SigLIP W4A8 with a static symmetric int8 quantizer (int8 GEMMs in the prefix, where batch 8's
# 6144 image tokens are compute-bound), without / with its attention at W8.
_SIG_A8 = dataclasses.replace(_SIG_RULE, act_bits=8, act_scale="static", act_symmetric=True)
CANDIDATES.update({
    "fastsiga8m8": _with("fastm8", "fast, SigLIP W4A8 static, adaRMS W8", _SIG_A8),
})
CANDIDATES["fastsa8a8m8"] = _with(
    "fastm8", "fast, SigLIP W4A8 static with its attention W8A8, adaRMS W8",
    dataclasses.replace(_SIG_A8, pattern=SIG_ATT, weight_bits=8), _SIG_A8)
# The smoothing strength of `fast`'s rules that smooth (0.5 in the preset; folded into norms and
# the up projections, so no run-time cost), with `fastsa8m8`'s W8 parts.
def _alpha(cfg: QuantConfig, a: float) -> tuple[LayerRule, ...]:
  return tuple(dataclasses.replace(r, smooth_alpha=a) if r.smooth_alpha is not None else r
               for r in cfg.rules)


CANDIDATES.update({
    f"fastsa8m8a{int(a * 100)}": dataclasses.replace(
        CANDIDATES["fastsa8m8"], name=f"fast, SigLIP attention W8 wo, adaRMS W8, smooth_alpha {a}",
        rules=_alpha(CANDIDATES["fastsa8m8"], a))
    for a in (0.3, 0.7, 0.85)})
CANDIDATES["fastsig8wm8"] = _with("fastsig8w", "fast, SigLIP W8 weight-only, adaRMS W8", _ADARMS8)
# pi0.5 is 7 MB over 0.30x with all of SigLIP at W8: its expert's q projection W4 weight-only
# (W8 in `fast`) gives back 19 MB.
CANDIDATES["fastsig8wm8q4"] = _with(
    "fastsig8wm8", "fast, SigLIP W8 weight-only, adaRMS W8, expert q W4 weight-only",
    LayerRule(pattern=pattern(("q",), ("_1",)), act_bits=None, smooth_alpha=None,
              rotation="none", permutation="none", rounding="gptq"))
# SigLIP's attention and fc2 at W8 weight-only with the expert MLP at W8: pi0's error is SigLIP's
# (all of it at W8 is 0.46x `recommended`, at 0.311x), fc1 at W8 measured no gain; the expert's q
# projection W4 weight-only gives back 19 MB to stay inside 0.30x.
_SF28 = dataclasses.replace(_SIG_RULE, pattern=SIG_FC2, weight_bits=8)
_Q4 = CANDIDATES["fastsig8wm8q4"].rules[0]
CANDIDATES.update({
    "fastsa8f28mlp8m8": _with("fastsa8mlp8m8", "fast, SigLIP attention and fc2 W8 wo, expert MLP "
                              "W8, adaRMS W8", _SF28),
    "fastsa8f28mlp8q4m8": _with("fastsa8mlp8m8", "fast, SigLIP attention and fc2 W8 wo, expert "
                                "MLP W8, expert q W4 wo, adaRMS W8", _Q4, _SF28),
    "fastsa8f18mlp8q4m8": _with("fastsa8mlp8m8", "fast, SigLIP attention and fc1 W8 wo, expert "
                                "MLP W8, expert q W4 wo, adaRMS W8", _Q4,
                                dataclasses.replace(_SIG_RULE, pattern=SIG_FC1, weight_bits=8)),
    "fastsm8mlp8q4m8": _with("fastmlp8m8", "fast, SigLIP MLP W8 wo, expert MLP W8, expert q W4 "
                             "wo, adaRMS W8", _Q4,
                             dataclasses.replace(_SIG_RULE, pattern=SIG_MLP, weight_bits=8)),
})
# Accuracy probe: SigLIP's W4 weight-only error against incoherence. A block-64 Hadamard rotation
# of the inputs of SigLIP's q / k / v / fc1 (the residual stream's readers), block 8 for out
# (inside its heads of 72), computed online; fc2's 4304-wide input has no power-of-two block
# beyond 16, so fc2 stays as `fast`'s. If it recovers most of what W8 does, the same rotation
# folded offline into SigLIP's residual stream would cost nothing at run time.
_SIG_H64 = (dataclasses.replace(_SIG_RULE, pattern=pattern(("query", "key", "value", "fc1")),
                                rotation="hadamard", block_size=64),
            dataclasses.replace(_SIG_RULE, pattern=SIG_OUT, rotation="hadamard", block_size=8))
CANDIDATES["fastsigh64"] = _with("fast", "fast, SigLIP (not fc2) W4 wo behind an online Hadamard "
                                 "b64 (out b8)", *_SIG_H64)
CANDIDATES["fastsigh64mlp8m8"] = _with("fastmlp8m8", "fast, SigLIP (not fc2) W4 wo behind an "
                                       "online Hadamard b64 (out b8), expert MLP W8, adaRMS W8",
                                       *_SIG_H64)
# The expert attention's W8 weight-only codes symmetric: no zero point, so the flow steps' q / kv
# and o projections need no per-token input sum beside their GEMM (one reduction kernel fewer per
# projection and flow step).
CANDIDATES["fastea8s"] = _with(
    "fast", "fast, expert attention W8 weight-only symmetric",
    LayerRule(pattern=EXPERT_ATTN, weight_bits=8, act_bits=None, smooth_alpha=None,
              rotation="none", permutation="none", rounding="gptq", weight_symmetric=True))
# The expert attention (q, kv, o) W4A8 with static symmetric scales, as the LLM's linears in
# `fast`: its stacked int4 weights then take the Mosaic kernel in place in the flow steps, where
# `fast`'s W8 weight-only codes are sliced out of their stacks for XLA's GEMM at every step.
CANDIDATES["fastea4"] = _fast(
    "fast, expert attention W4A8 static",
    eattn=LayerRule(pattern=EXPERT_ATTN, act_scale="static", act_symmetric=True,
                    smooth_alpha=None, rotation="none", permutation="none", rounding="gptq"))
# SigLIP's W4 weight-only codes with a scale and zero point per group of input channels (GPTQ as
# `fast`'s SigLIP rule): SigLIP's attention projections are `fast`'s worst layers on the demo, and
# weight-only groups cost no activation work, only the dequantization XLA fuses into the prefix's
# GEMMs. fc2's input (4304 wide at full size, 16 x 269) only divides into groups of 16.
_SIG_G = lambda pat, g: dataclasses.replace(  # noqa: E731
    _SIG_RULE, pattern=pat, weight_granularity="group", group_size=g)
CANDIDATES.update({
    "fastsag16": _with("fast", "fast, SigLIP attention W4 groups of 16", _SIG_G(SIG_ATT, 16)),
    "fastsigg16": _with("fast", "fast, SigLIP W4 groups of 16", _SIG_G(SIG, 16)),
    "fastsigg32": _with("fast", "fast, SigLIP W4 groups of 32 (fc2 of 16)",
                        _SIG_G(SIG_FC2, 16), _SIG_G(SIG, 32)),
})
# The GPTQ presets rounding in channel order, GPTQ's act-order off (the presets use it; the codes
# are stored in channel order either way, so the two cost the same at run time).
def _channel_order(key: str, name: str) -> QuantConfig:
  cfg = resolve(key)
  return dataclasses.replace(cfg, name=name, rules=tuple(
      dataclasses.replace(r, gptq_act_order=False) for r in cfg.rules))


CANDIDATES.update({
    "fastco": _channel_order("fast", "fast, GPTQ in channel order"),
    "recco": _channel_order("recommended", "recommended, GPTQ in channel order"),
})


# The static activation scales' calibration percentile (99.9 in `fast`: the percentile of the
# calibration rows' per-token ranges that maps to the int8 range); 100 is the largest range seen.
def _percentile(key: str, p: float) -> QuantConfig:
  cfg = resolve(key)
  return dataclasses.replace(cfg, name=f"{cfg.name}, static scales at percentile {p}", rules=tuple(
      dataclasses.replace(r, act_percentile=p) if r.act_scale == "static" else r
      for r in cfg.rules))


CANDIDATES.update({key: _percentile("fast", p)
                   for key, p in (("fastp99", 99.0), ("fastp9999", 99.99), ("fastp100", 100.0))})


# The token embedding below 4 bits, to make room for SigLIP and the expert MLP at W8 on pi0
# (the embedding is only gathered: 48 prompt rows per call, no GEMM reads it).
def _embedding(key: str, name: str, bits: int, group_size: int = 128) -> QuantConfig:
  """Candidate `key` with `fast-accurate`'s token-table rule at `bits` and `group_size`."""
  cfg = resolve(key)
  rule = dataclasses.replace(get_preset("fast-accurate").embeddings[0], bits=bits,
                             group_size=group_size)
  return dataclasses.replace(cfg, name=f"{cfg.name}, {name}", embeddings=(rule,))


CANDIDATES.update({
    "fastsig8wmlp8m8e2": _embedding("fastsig8wmlp8m8", "embedding W2 g128", 2),
    "fastsig8wmlp8m8e2g64": _embedding("fastsig8wmlp8m8", "embedding W2 g64", 2, 64),
    "fastsig8wmlp8m8e3": _embedding("fastsig8wmlp8m8", "embedding W3 g128", 3),
})


# The expert attention left in bf16 (its projections on the GEMM library's bf16 kernels, as in
# the float policy): at batch 8 the flow steps' W8 weight-only projections took about as long as
# the expert MLP's kernels (BENCHMARKS.md, "Where the time goes at batch 8").
CANDIDATES["fastea16"] = _with("fast", "fast, expert attention bf16",
                               LayerRule(pattern=EXPERT_ATTN, skip=True))
