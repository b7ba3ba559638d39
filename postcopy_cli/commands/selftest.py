"""`postcopy selftest`."""
import click

from ._common import common_options, not_built


@click.command("selftest")
@common_options
def selftest(as_json: bool) -> None:
    """(not built yet)"""
    not_built("postcopy selftest")
