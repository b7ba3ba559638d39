"""`postcopy workload`."""
import click

from ._common import common_options, not_built


@click.command("workload")
@common_options
def workload(as_json: bool) -> None:
    """(not built yet)"""
    not_built("postcopy workload")
