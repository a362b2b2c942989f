import fcntl
import functools
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

from duquant_jax.models import get_policy
from duquant_jax.lab.synthetic import realistic_params


_OWN_DIRS = pytest.StashKey[list]()


def pytest_configure(config):
  """One persistent compilation cache for the whole run, shared by pytest-xdist's workers (they
  inherit the controller's environment): the demo models' programs (calibration, packing,
  sample_actions) compile once per run, not once per worker. And one directory per run for
  `across_workers` fixtures, always fresh: a pickled fixture never outlives the code that built
  it, even where DUQUANT_TEST_COMPILE_CACHE names a lasting cache."""
  own = config.stash[_OWN_DIRS] = []
  worker = hasattr(config, "workerinput")  # an xdist worker: the controller made both
  for var in ("DUQUANT_TEST_COMPILE_CACHE", "DUQUANT_TEST_RUN_DIR"):
    if var not in os.environ or (var == "DUQUANT_TEST_RUN_DIR" and not worker):
      os.environ[var] = tempfile.mkdtemp(prefix="duquant-jax-tests-")
      own.append(os.environ[var])
  jax.config.update("jax_compilation_cache_dir", os.environ["DUQUANT_TEST_COMPILE_CACHE"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_unconfigure(config):
  for own in config.stash.get(_OWN_DIRS, []):
    shutil.rmtree(own, ignore_errors=True)


def across_workers(build):
  """`functools.cache`, and one build per run across pytest-xdist's workers: the first worker to
  ask builds the value under a file lock and pickles it into the run's directory; the others wait
  for it and load it. For the slow demo fixtures (calibration, GPTQ packing) that several test
  files read, so two workers do not both spend the CPU on the same value."""
  @functools.cache
  @functools.wraps(build)
  def shared(*args):
    root = os.environ.get("DUQUANT_TEST_RUN_DIR")
    if root is None:
      return build(*args)
    path = Path(root, "fixtures", "-".join([build.__name__, *map(str, args)]) + ".pkl")
    path.parent.mkdir(exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if path.exists():
        return pickle.loads(path.read_bytes())
      value = build(*args)
      tmp = path.with_suffix(".tmp")
      tmp.write_bytes(pickle.dumps(value))
      tmp.rename(path)
      return value
  return shared


@functools.cache
def demo_params(model: str = "pi0", seed: int = 0):
  """Realistic demo params, built once per test session."""
  return realistic_params(get_policy(model, "demo"), seed)


@pytest.fixture(params=["pi0", "pi05"])
def model_name(request):
  return request.param


@pytest.fixture
def demo(model_name):
  policy = get_policy(model_name, "demo")
  return policy, demo_params(model_name)


@pytest.fixture
def demo_obs(demo):
  policy, _ = demo
  return policy.example_observation(jax.random.key(1), batch_size=2)


@across_workers
def demo_stats(model: str = "pi0", num_batches: int = 4):
  """Calibration stats of the demo model from a few rollout batches, built once per session.

  Every linear a preset quantizes is captured (SigLIP's too, for `fast`), with its input Hessian
  (GPTQ rules: `recommended`, `fast`).
  """
  from duquant_jax.calib_data import calibration_batches
  from duquant_jax.calibrate import CalibConfig, calibrate, select_for
  from duquant_jax.config import get_preset
  policy = get_policy(model, "demo")
  params = demo_params(model)
  batches = calibration_batches(policy, params, jax.random.key(0), num_batches=num_batches,
                                batch_size=2, num_chunks=4)
  cfg = CalibConfig(progress=False, chunk_size=num_batches, hessian=".*",
                    select=select_for(get_preset("fast"), params))
  return calibrate(policy, params, batches, cfg, rng=jax.random.key(1))


@across_workers
def fast_packed(model: str = "pi0"):
  """The demo model packed with the `fast` preset (GPTQ: a few seconds), once per session."""
  from duquant_jax.config import get_preset
  from duquant_jax.quantize import quantize_params
  return quantize_params(demo_params(model), get_preset("fast"), demo_stats(model))


@functools.cache
def held_out(model: str = "pi0", batch: int = 4):
  from duquant_jax.calib_data import calibration_batches
  policy = get_policy(model, "demo")
  obs = calibration_batches(policy, demo_params(model), jax.random.key(1000), num_batches=1,
                            batch_size=batch, num_chunks=4)
  return jax.tree.map(lambda x: x[0], obs)


@functools.cache
def packed_sample_actions(model: str = "pi0"):
  """The demo policy's jitted `sample_actions` under `PackedRuntime` (it runs float and packed
  trees alike), one per session: a tree structure it has run before runs without a new compile.
  Not for tests that patch what the trace calls (a cached program would not see the patch).

  It jits a function of its own, not the bound method: jax keys its trace cache on the function
  by equality, and a live entry for `policy.sample_actions` would serve the equal bound method of
  another test's policy, traced before that test's patches."""
  from duquant_jax.runtime import PackedRuntime
  policy = get_policy(model, "demo", runtime=PackedRuntime())
  return jax.jit(lambda params, obs, rng: policy.sample_actions(params, obs, rng))


def run_cli(args, capsys):
  """`duquant-jax ARGS` in this process: (exit code, stdout, stderr)."""
  from duquant_jax.cli import main
  with pytest.raises(SystemExit) as e:
    main([str(a) for a in args])
  out = capsys.readouterr()
  return e.value.code, out.out, out.err
