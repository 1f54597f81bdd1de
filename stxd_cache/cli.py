"""`stxd-cache`: extract the LiDAR teacher into a Zarr cache, and inspect or verify caches."""

from __future__ import annotations

import click

from pipelines.cli_support import StxdGroup, debug_option


@click.group(cls=StxdGroup)
@debug_option
def main() -> None:
    """Teacher caches for stxd (stage one). Commands: none yet in this release; see README."""
