"""The `duquant-jax` command line (console script `duquant-jax = duquant_jax.cli:main`).

`app` mounts the sub-commands of `info`, `checkpoint`, `lab`, `serve` and `bench`; see
`duquant_jax.cli.app`.
"""

from duquant_jax.cli.app import app, main

__all__ = ["app", "main"]
