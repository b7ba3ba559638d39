"""`postcopy migrate`."""
import click

from ._common import common_options, not_built


@click.command("migrate")
@common_options
def migrate(as_json: bool) -> None:
    """(not built yet)"""
    not_built("postcopy migrate")
