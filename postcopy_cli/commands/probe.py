"""`postcopy probe`."""
import click

from ._common import common_options, not_built


@click.command("probe")
@common_options
def probe(as_json: bool) -> None:
    """(not built yet)"""
    not_built("postcopy probe")
