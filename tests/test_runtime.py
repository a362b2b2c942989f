"""`duquant_jax.runtime`: packed weights are data and the runtime runs them; the execution choices
(`Execution`) give the same numbers on the CPU's XLA paths; the model package knows no packed type."""

import ast
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import duquant_jax
from duquant_jax import runtime
from duquant_jax.config import get_preset
from duquant_jax.embedding import PackedEmbedding
from duquant_jax.models import Policy, get_policy
from duquant_jax.packed import PackedLinear
from duquant_jax.quantize import quantize_params
from duquant_jax.runtime import Execution, PackedRuntime
from duquant_jax.lab.synthetic_stats import synthetic_stats

MODELS = pathlib.Path(duquant_jax.__file__).parent / "models"


def _public_methods(cls) -> set[str]:
  return {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}


def test_packed_weights_hold_only_data():
  """Array leaves and static format fields; beyond `replace` (flax.struct), only read-only
  helpers that compute from the data."""
  assert {f.name for f in dataclasses.fields(PackedLinear)} == {
      "codes", "scale", "zero", "transform", "out_rot", "act_scale", "act_zero",  # arrays
      "w_shape", "w_spec", "bits", "act_bits", "act_symmetric", "act_clip", "act_min_tokens",
      "mode", "input_group"}  # static format
  assert _public_methods(PackedLinear) == {"replace", "validate", "nbytes", "dequantize",
                                           "quantizes", "at_layer"}
  assert {f.name for f in dataclasses.fields(PackedEmbedding)} == {
      "codes", "scale", "zero", "bits", "dtype"}
  assert _public_methods(PackedEmbedding) == {"replace", "validate", "nbytes", "dequantize"}


def _imports(path: pathlib.Path) -> list[str]:
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      out.append(node.module)
  return out


def test_the_model_package_imports_nothing_of_the_library_outside_it():
  files = sorted(MODELS.glob("*.py"))
  assert files
  for path in files:
    outside = [m for m in _imports(path) if (m == "duquant_jax" or m.startswith("duquant_jax."))
               and not (m == "duquant_jax.models" or m.startswith("duquant_jax.models."))]
    assert not outside, (path.name, outside)
    names = {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
    assert not names & {"PackedLinear", "PackedEmbedding"}, path.name


def test_execution_is_a_validated_static_choice():
  assert Execution() == runtime.AUTO
  assert hash(Execution(matmul="xla")) == hash(Execution(matmul="xla"))
  assert hash(PackedRuntime(Execution(stacked_in_place=False)))  # a static jit argument
  with pytest.raises(ValueError, match="Execution.matmul"):
    Execution(matmul="cuda")
  with pytest.raises(ValueError, match="Execution.transform"):
    Execution(transform="fast")


@pytest.fixture(scope="module")
def deploy_pi0():
  policy = get_policy("pi0", "demo")
  params = policy.init(jax.random.key(0))
  packed = quantize_params(params, get_preset("deploy"), synthetic_stats(params))
  obs = policy.example_observation(jax.random.key(1), batch_size=2)
  return policy, params, packed, obs


def test_a_float_runtime_refuses_packed_leaves_by_name():
  from duquant_jax.embedding import quantize_embedding
  from duquant_jax.models.gemma import Embedder
  table = jax.random.normal(jax.random.key(0), (64, 32))
  tokens = jnp.array([[0, 5, 63]])
  variables = {"params": {"input_embedding": quantize_embedding(table, group_size=16)}}
  with pytest.raises(TypeError, match="PackedRuntime"):
    Embedder(64, 32).apply(variables, tokens, method=Embedder.encode)
  rows = Embedder(64, 32, PackedRuntime()).apply(variables, tokens, method=Embedder.encode)
  assert rows.shape == (1, 3, 32)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the XLA paths are the CPU's choice")
def test_execution_choices_give_the_same_actions_on_the_cpu(deploy_pi0):
  """On the CPU automatic dispatch takes the XLA paths: forcing them, or reading the stacked
  layers sliced instead of in place, runs the same arithmetic."""
  policy, params, packed, obs = deploy_pi0
  run = lambda execution, tree: np.asarray(jax.jit(
      Policy(policy.cfg, PackedRuntime(execution)).sample_actions)(tree, obs, jax.random.key(2)))
  auto = run(Execution(), packed)
  for execution in (Execution(matmul="xla", transform="xla"), Execution(stacked_in_place=False),
                    Execution(matmul="xla", stacked_in_place=False)):
    np.testing.assert_array_equal(run(execution, packed), auto, err_msg=str(execution))
  # Float trees run as the float policy runs them.
  np.testing.assert_array_equal(run(Execution(), params), np.asarray(jax.jit(
      policy.sample_actions)(params, obs, jax.random.key(2))))


def test_apply_packed_and_matmul_agree_for_every_xla_choice(deploy_pi0):
  _, _, packed, _ = deploy_pi0
  w = packed["PaliGemma"]["llm"]["layers"]["attn"]["q_einsum"]["w"].at_layer(0)
  x = jax.random.normal(jax.random.key(3), (5, w.in_features), jnp.float32)
  ref = np.asarray(runtime.apply_packed(w, x))
  for execution in (Execution(matmul="xla"), Execution(matmul="xla", transform="xla")):
    np.testing.assert_array_equal(np.asarray(runtime.apply_packed(w, x, execution)), ref)
    np.testing.assert_array_equal(np.asarray(runtime.matmul(w, x, execution)), ref)
