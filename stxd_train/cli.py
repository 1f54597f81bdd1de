"""`stxd-train`: teachers and camera students, evaluation, sweeps and diagnostics."""

from __future__ import annotations

import click

from pipelines.cli_support import StxdGroup, debug_option


@click.group(cls=StxdGroup)
@debug_option
def main() -> None:
    """Training for stxd (stage two). Commands: none yet in this release; see README."""
