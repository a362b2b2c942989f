"""The `duquant-jax` command line: one typer app with every sub-command mounted, and `main`.

The commands live in one module per group and map flags to library calls; they import the
library, never the other way round:

- `info`: layout, presets (what the library knows about models and presets);
- `checkpoint`: export-demo-fp, convert, inspect (openpi checkpoints in, packed checkpoints out);
- `lab`: demo, eval, diagnose (the research harness, `duquant_jax.lab`);
- `serve`: serve (a packed checkpoint behind openpi's websocket protocol);
- `bench`: bench (the benchmark scripts of a source checkout).

`COMMANDS` mounts them in the order `duquant-jax --help` lists them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import typer

from duquant_jax.cli import bench, checkpoint, info, lab, serve

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="DuQuant W4A8 quantization of openpi pi0 / pi0.5 policies in JAX.")


@app.callback()
def _root() -> None:
  """DuQuant W4A8 quantization of openpi pi0 / pi0.5 policies in JAX."""


# (command name, function, extra arguments of `app.command`), in the order of `--help`.
COMMANDS: tuple[tuple[str, Callable[..., Any], dict[str, Any]], ...] = (
    ("layout", info.layout, {}),
    ("export-demo-fp", checkpoint.export_demo_fp, {}),
    ("convert", checkpoint.convert, {}),
    ("inspect", checkpoint.inspect, {}),
    ("eval", lab.eval_cmd, {}),
    ("diagnose", lab.diagnose, {}),
    ("serve", serve.serve, {}),
    ("demo", lab.demo, {}),
    ("presets", info.presets, {}),
    ("bench", bench.bench, {"context_settings": bench.CONTEXT_SETTINGS}),
)
for _name, _command, _kwargs in COMMANDS:
  app.command(_name, **_kwargs)(_command)


def main(argv: Optional[list[str]] = None) -> None:
  """Runs `duquant-jax` (the console script) on `argv` (default: the process's arguments).

  Raises:
    SystemExit: always, with the command's exit status (typer's standalone mode).
  """
  app(args=argv, prog_name="duquant-jax")

