"""Merging openpi LoRA branches: the merged weight must reproduce openpi's LoRA forward.

The forward below is written from openpi's contract (`src/openpi/models/lora.py`), not from
`duquant_jax.lora`: an Einsum's branch renames the weight's last letter to the rank letter for
`lora_a` (in the weight and the output), its second-to-last letter for `lora_b`, and scales by
alpha / rank (alpha / sqrt(rank) with rslora); a FeedForward's branch is `(x @ a) @ b`, unscaled.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import demo_params
from duquant_jax.lora import LoraSpec, find_lora, lora_delta, merge_lora
from duquant_jax.treepath import get_path

RANK_LETTER = "L"


def _digits_to_letters(eqn):
  return eqn.replace("2", "Z").replace("3", "Y")


def openpi_einsum_lora(eqn, x, w, a, b, scaling):
  """einsum(eqn, x, w) + the LoRA branch, as openpi's lora.Einsum computes it."""
  eqn = _digits_to_letters(eqn)
  lhs, rhs, out = re.match("(.*),(.*)->(.*)", eqn).groups()
  a_label, b_label = rhs[-2], rhs[-1]
  a_rhs, a_out = rhs.replace(b_label, RANK_LETTER), out.replace(b_label, RANK_LETTER)
  b_rhs = rhs.replace(a_label, RANK_LETTER)
  branch = np.einsum(f"{a_out},{b_rhs}->{out}", np.einsum(f"{lhs},{a_rhs}->{a_out}", x, a), b)
  return np.einsum(eqn, x, w) + branch * scaling


# (eqn, w shape, x shape) of openpi's Gemma einsums (per layer), small sizes.
EINSUMS = [
    ("BTD,NDH->BTNH", (4, 32, 8), (2, 5, 32)),
    ("BSD,2KDH->2BSKH", (2, 1, 32, 8), (2, 5, 32)),
    ("BTNH,NHD->BTD", (4, 8, 32), (2, 5, 4, 8)),
    ("BSD,3KDH->3BSKH", (3, 4, 32, 8), (2, 5, 32)),
]


@pytest.mark.parametrize("eqn,w_shape,x_shape", EINSUMS)
@pytest.mark.parametrize("rank,alpha,rslora", [(4, None, False), (16, 4.0, True)])
def test_einsum_delta_equals_openpi_branch(eqn, w_shape, x_shape, rank, alpha, rslora):
  rng = np.random.default_rng(0)
  w = rng.normal(size=w_shape)
  a = rng.normal(size=w_shape[:-1] + (rank,)) * 0.3
  b = rng.normal(size=w_shape[:-2] + (rank, w_shape[-1])) * 0.3
  x = rng.normal(size=x_shape)
  spec = LoraSpec(alpha=alpha, rslora=rslora)
  s = (alpha or rank) / (math.sqrt(rank) if rslora else rank)
  assert spec.scaling(rank) == pytest.approx(s)
  want = openpi_einsum_lora(eqn, x, w, a, b, s)
  merged = w + s * lora_delta(eqn, a, b)
  got = np.einsum(_digits_to_letters(eqn), x, merged)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _add_lora(params, rank_llm=4, rank_expert=8, seed=0):
  """A LoRA fine-tune of the demo tree: openpi's leaves beside every Gemma weight it adapts."""
  out = jax.tree.map(np.asarray, params)
  layers = out["PaliGemma"]["llm"]["layers"]
  rng = np.random.default_rng(seed)
  for sfx, r in (("", rank_llm), ("_1", rank_expert)):
    for name in ("q_einsum", "kv_einsum", "attn_vec_einsum"):
      mod = layers["attn"][name + sfx]
      w = mod["w"]
      mod["lora_a"] = (0.05 * rng.normal(size=w.shape[:-1] + (r,))).astype(w.dtype)
      mod["lora_b"] = (0.05 * rng.normal(size=w.shape[:-2] + (r, w.shape[-1]))).astype(w.dtype)
    mlp = layers["mlp" + sfx]
    for name in ("gating_einsum", "linear"):
      w = mlp[name]
      mlp[name + "_lora_a"] = (0.05 * rng.normal(size=w.shape[:-1] + (r,))).astype(w.dtype)
      mlp[name + "_lora_b"] = (0.05 * rng.normal(size=w.shape[:-2] + (r, w.shape[-1]))).astype(
          w.dtype)
  return out


def _mlp_forward(x, gating, linear, lora=None):
  """openpi's FeedForward on one layer: gelu(x @ gate) * (x @ up) @ down, LoRA branches unscaled."""
  def dot(x, w, ab):
    y = x @ w
    return y if ab is None else y + (x @ ab[0]) @ ab[1]
  ga, gb, la, lb = lora if lora is not None else (None,) * 4
  gate = dot(x, gating[0], None if lora is None else (ga[0], gb[0]))
  up = dot(x, gating[1], None if lora is None else (ga[1], gb[1]))
  gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
  return dot(gelu * up, linear, None if lora is None else (la, lb))


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_demo_tree_matches_lora_forward(rslora):
  """Every adapted weight of a demo tree (stacked layers, both experts): the merged weight's
  output equals openpi's LoRA forward, with alpha applied to attention only."""
  params = _add_lora(demo_params("pi0"))
  spec = LoraSpec(alpha=2.0, rslora=rslora)
  found = find_lora(params)
  assert len(found) == 10 and {lw.rank for lw in found.values()} == {4, 8}
  merged = merge_lora(params, spec)
  assert not any("lora" in p for p, _ in jax.tree_util.tree_flatten_with_path(merged)[0]
                 for p in [jax.tree_util.keystr(p)])
  layers, mlayers = params["PaliGemma"]["llm"]["layers"], merged["PaliGemma"]["llm"]["layers"]
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 3, 256))
  for sfx, width, r in (("", 256, 4), ("_1", 128, 8)):
    s = 2.0 / (math.sqrt(r) if rslora else r)
    for name, eqn in (("q_einsum", "BTD,NDH->BTNH"), ("kv_einsum", "BSD,2KDH->2BSKH"),
                      ("attn_vec_einsum", "BTNH,NHD->BTD")):
      mod, mw = layers["attn"][name + sfx], mlayers["attn"][name + sfx]["w"]
      for layer in range(mod["w"].shape[0]):
        w, a, b = (mod[k][layer] for k in ("w", "lora_a", "lora_b"))
        xin = x[..., :width] if name != "attn_vec_einsum" else rng.normal(size=(2, 3) + w.shape[:2])
        want = openpi_einsum_lora(eqn, xin, w, a, b, s)
        got = np.einsum(_digits_to_letters(eqn), xin, mw[layer])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{name}{sfx}")
    mlp, mm = layers["mlp" + sfx], mlayers["mlp" + sfx]
    for layer in range(mlp["linear"].shape[0]):
      lo = tuple(mlp[k][layer] for k in ("gating_einsum_lora_a", "gating_einsum_lora_b",
                                          "linear_lora_a", "linear_lora_b"))
      want = _mlp_forward(x[..., :width], mlp["gating_einsum"][layer], mlp["linear"][layer], lo)
      got = _mlp_forward(x[..., :width], mm["gating_einsum"][layer], mm["linear"][layer])
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"mlp{sfx}")


def test_merge_keeps_dtype_and_is_pure():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _add_lora(demo_params("pi0")))
  assert params["PaliGemma"]["llm"]["layers"]["mlp"]["linear_lora_a"].dtype == jnp.bfloat16
  merged = merge_lora(params)
  w = get_path(merged, "PaliGemma/llm/layers/attn/q_einsum/w")
  assert w.dtype == jnp.bfloat16
  assert "lora_a" in get_path(params, "PaliGemma/llm/layers/attn/q_einsum")  # input unchanged


def test_inconsistent_lora_leaves_are_named():
  params = _add_lora(demo_params("pi0"))
  q = params["PaliGemma"]["llm"]["layers"]["attn"]["q_einsum"]
  bad = dict(q)
  del bad["lora_b"]
  params["PaliGemma"]["llm"]["layers"]["attn"]["q_einsum"] = bad
  with pytest.raises(ValueError, match=r"q_einsum/lora_a: LoRA leaf without its lora_b"):
    find_lora(params)
  bad["lora_b"] = q["lora_b"][..., :2, :]
  with pytest.raises(ValueError, match=r"q_einsum/w: LoRA shapes do not fit"):
    find_lora(params)
  with pytest.raises(ValueError, match="alpha"):
    LoraSpec(alpha=0.0)
