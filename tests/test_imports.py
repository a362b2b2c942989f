"""The package's import graph: no import circle, and no module imports one above it in the pipeline.

Every module of `duquant_jax` is parsed with `ast` (nothing is imported); its imports, at module
level and inside functions alike, give the edges of the graph between the package's modules.
`from duquant_jax.x import name` is an edge to `duquant_jax.x.name` where that is a module, else to
`duquant_jax.x`. A package's `__init__` is a node like any module: it may import its children, and a
child that imports its own package's `__init__` closes a circle.
"""

import ast
import pathlib

import pytest

ROOT = "duquant_jax"
PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / ROOT

# The pipeline, lowest level first: a module may import modules of its own level or of a lower one,
# never of a higher one. An entry names a module or a package (covering its submodules); the root
# package `duquant_jax` stands for its `__init__` only, the public API, which re-exports the core.
# Names that no module has yet are the target layout's (issue 18); they cost nothing until one does.
LEVELS: tuple[tuple[str, ...], ...] = (
    # 0: the float model (openpi's pi0 / pi0.5 param layout, the toy environment), the table of
    #    openpi's param paths and the tree-path helpers.
    ("duquant_jax.models", "duquant_jax.openpi_paths", "duquant_jax.treepath", "duquant_jax.version"),
    # 1: what to quantize: rules, presets, declared layouts.
    ("duquant_jax.config", "duquant_jax.rules", "duquant_jax.presets", "duquant_jax.layouts"),
    # 2: numerics: rotations, transforms, GPTQ, streaming statistics, int grids.
    ("duquant_jax.rotations", "duquant_jax.transforms", "duquant_jax.gptq", "duquant_jax.stats",
     "duquant_jax.numerics"),
    # 3: packed weights and tables, as data.
    ("duquant_jax.packed", "duquant_jax.embedding"),
    # 4: float params -> packed params.
    ("duquant_jax.quantize", "duquant_jax.model_rotation", "duquant_jax.lora"),
    # 5: executing packed weights: the ops (kernels) and the runtime.
    ("duquant_jax.kernels", "duquant_jax.ops", "duquant_jax.runtime", "duquant_jax.inference"),
    # 6: calibration (capture, the driver, data) and what runs FP and packed policies on its
    #    batches; nnx_models is here because `calibrate_nnx` drives `capture`.
    ("duquant_jax.calibrate", "duquant_jax.capture", "duquant_jax.calib_data", "duquant_jax.calib",
     "duquant_jax.attention_balance", "duquant_jax.nnx_models"),
    # 7: checkpoints (packed and openpi), running packed weights in openpi, serving.
    ("duquant_jax.checkpoint", "duquant_jax.openpi_io", "duquant_jax.openpi_checkpoint",
     "duquant_jax.openpi_runtime", "duquant_jax.serve", "duquant_jax.io"),
    # 8: the public API.
    (ROOT,),
    # 9: the research harness: evaluation, diagnostics, demo, synthetic weights and stats.
    ("duquant_jax.lab",),
    # 10: the command line.
    ("duquant_jax.cli",),
)

# Packages whose modules import only each other: the model code knows nothing of quantization.
SELF_CONTAINED = ("duquant_jax.models",)

# Edges (importer, imported) that break a rule while another helper of issue 18 moves the code;
# the test fails when one no longer occurs or no longer breaks a rule, so this set only shrinks.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset({
})


def _module_files() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every module and package of duquant_jax."""
  out = {}
  for f in sorted(PACKAGE_DIR.rglob("*.py")):
    parts = list(f.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__main__":  # runs the CLI; nothing imports it
      continue
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = f
  return out


def _imports(name: str, path: pathlib.Path, modules: set[str]) -> set[str]:
  """The modules of `modules` that module `name` (file `path`) imports, anywhere in its code."""
  is_package = path.name == "__init__.py"
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        target = alias.name
        while target and target not in modules:  # `import a.b.c` reaches the deepest module
          target = target.rpartition(".")[0]
        if target:
          out.add(target)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: from the module's own package upwards
        base = name if is_package else name.rpartition(".")[0]
        for _ in range(node.level - 1):
          base = base.rpartition(".")[0]
        base = f"{base}.{node.module}" if node.module else base
      else:
        base = node.module
      for alias in node.names:
        if f"{base}.{alias.name}" in modules:
          out.add(f"{base}.{alias.name}")
        elif base in modules:
          out.add(base)
  out.discard(name)
  return out


def import_graph() -> dict[str, set[str]]:
  """duquant_jax module -> the duquant_jax modules it imports."""
  files = _module_files()
  return {name: _imports(name, path, set(files)) for name, path in files.items()}


def level_of(module: str) -> int | None:
  """The pipeline level of `module` (its own entry, else its nearest package's), or None."""
  entries = {name: i for i, names in enumerate(LEVELS) for name in names}
  name = module
  while name:
    if name in entries and (name != ROOT or module == ROOT):
      return entries[name]
    name = name.rpartition(".")[0]
  return None


def _in_package(module: str, package: str) -> bool:
  return module == package or module.startswith(package + ".")


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _rule_broken(a: str, b: str) -> str | None:
  """The layering rule that `a` importing `b` breaks, or None."""
  la, lb = level_of(a), level_of(b)
  if la is not None and lb is not None and lb > la:
    return f"imports a higher level ({la} imports {lb})"
  if any(_in_package(a, p) and not _in_package(b, p) for p in SELF_CONTAINED):
    return "leaves a self-contained package"
  return None


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
  seen, todo = set(), [start]
  while todo:
    v = todo.pop()
    if v == goal:
      return True
    if v not in seen:
      seen.add(v)
      todo.extend(graph.get(v, ()))
  return False


def _without_known(graph: dict[str, set[str]]) -> dict[str, set[str]]:
  return {a: {b for b in targets if (a, b) not in KNOWN_VIOLATIONS} for a, targets in graph.items()}


@pytest.fixture(scope="module")
def graph():
  return import_graph()


def test_the_graph_is_read(graph):
  # Imports at module level and inside functions, absolute and relative, modules and packages.
  assert "duquant_jax.quantize" in graph["duquant_jax"]
  assert "duquant_jax.models.pi0" in graph["duquant_jax.models"]
  assert "duquant_jax.cli.app" in graph["duquant_jax.cli"]
  assert len(graph) > 40


def test_every_module_has_a_level(graph):
  missing = sorted(m for m in graph if level_of(m) is None)
  assert not missing, f"add these modules to LEVELS in {__file__}: {missing}"


def test_no_import_circle(graph):
  assert _circles(_without_known(graph)) == []


def test_no_module_imports_a_higher_level(graph):
  new = sorted(f"{a} -> {b}: {_rule_broken(a, b)}" for a, targets in graph.items()
               for b in targets if _rule_broken(a, b) and (a, b) not in KNOWN_VIOLATIONS)
  assert not new, "\n".join(new)


def test_known_violations_still_occur(graph):
  # A fixed violation leaves the set, so that it cannot come back unnoticed.
  gone = sorted((a, b) for a, b in KNOWN_VIOLATIONS
                if b not in graph.get(a, ()) or not (_rule_broken(a, b) or _reaches(graph, b, a)))
  assert not gone, f"no longer violations; remove them from KNOWN_VIOLATIONS: {gone}"


def test_the_library_never_imports_the_harness_or_the_cli(graph):
  core = [m for m in graph if not _in_package(m, "duquant_jax.lab")
          and not _in_package(m, "duquant_jax.cli")]
  bad = sorted((a, b) for a in core for b in graph[a]
               if _in_package(b, "duquant_jax.lab") or _in_package(b, "duquant_jax.cli"))
  assert not bad


def test_the_checker_finds_what_it_should():
  # Known answers on a small graph: a circle, an upward import, a model importing outside models.
  toy = {"duquant_jax.packed": {"duquant_jax.embedding"},
         "duquant_jax.embedding": {"duquant_jax.packed", "duquant_jax.quantize"},
         "duquant_jax.quantize": set(),
         "duquant_jax.models.pi0": {"duquant_jax.treepath"},
         "duquant_jax.treepath": set()}
  assert _circles(toy) == [["duquant_jax.embedding", "duquant_jax.packed"]]
  broken = {(a, b): _rule_broken(a, b) for a, targets in toy.items() for b in targets}
  assert broken == {
      ("duquant_jax.packed", "duquant_jax.embedding"): None,
      ("duquant_jax.embedding", "duquant_jax.packed"): None,
      ("duquant_jax.embedding", "duquant_jax.quantize"): "imports a higher level (3 imports 4)",
      ("duquant_jax.models.pi0", "duquant_jax.treepath"): "leaves a self-contained package",
  }
  assert _reaches(toy, "duquant_jax.packed", "duquant_jax.packed")
  assert not _reaches(toy, "duquant_jax.quantize", "duquant_jax.embedding")
  assert level_of("duquant_jax") == 8 and level_of("duquant_jax.cli.app") == 10
  assert level_of("duquant_jax.models.gemma") == 0 and level_of("duquant_jax.nowhere") is None
