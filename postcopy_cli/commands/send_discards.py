"""`postcopy send-discards`."""
import click

from ._common import common_options, not_built


@click.command("send-discards")
@common_options
def send_discards(as_json: bool) -> None:
    """(not built yet)"""
    not_built("postcopy send-discards")
