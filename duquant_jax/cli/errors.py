"""How every `duquant-jax` command reports an expected failure: one `error: ...` line, exit 2."""

from __future__ import annotations

import typer


def fail(message: str, code: int = 2) -> None:
  """Prints one clear error line on stderr and exits non-zero.

  Args:
    message: the error, naming what was wrong (a path, a flag and its value).
    code: the exit status.

  Raises:
    typer.Exit: always.
  """
  typer.echo(f"error: {message}", err=True)
  raise typer.Exit(code)
