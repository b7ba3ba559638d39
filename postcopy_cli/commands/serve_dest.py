"""`postcopy serve-dest`."""
import click

from ._common import common_options, not_built


@click.command("serve-dest")
@common_options
def serve_dest(as_json: bool) -> None:
    """(not built yet)"""
    not_built("postcopy serve-dest")
