"""The ``postcopy`` command group and the one place that maps errors to exit codes.

Commands live in ``postcopy_cli.commands``; each parses options, calls one core
function and renders the result.  Errors: one line on stderr, exit code per
DESIGN.md section 2 (0 ok, 1 failed, 2 usage, 3 protocol, 4 disconnected).
"""
from __future__ import annotations

import logging
import sys

import click

from . import __version__, errors, signals
from .commands import ALL_COMMANDS


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version=__version__, prog_name="postcopy")
def cli() -> None:
    """Post-copy memory migration on Linux with userfaultfd.

    Memory moves from a source host to a destination while the program keeps
    running; pages not there yet are caught by userfaultfd, fetched from the
    source and installed atomically.
    """


for _command in ALL_COMMANDS:
    cli.add_command(_command)


def _fail(code: int, message: str) -> int:
    click.echo(f"postcopy: {message}", err=True)
    return code


def _interrupted(message: str, code: int) -> int:
    # whatever a stop by a signal made fail, the cause is the signal
    stop = signals.interruption()
    return _fail(stop.exit_code, str(stop)) if stop is not None else _fail(code, message)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (no sys.exit, for tests and embedding)."""
    with signals.installed():
        try:
            # without standalone mode, click returns ctx.exit()'s code instead of exiting
            rv = cli.main(args=argv, prog_name="postcopy", standalone_mode=False)
            return rv if isinstance(rv, int) else errors.EXIT_OK
        except click.exceptions.Exit as e:
            return e.exit_code
        except click.exceptions.Abort:
            return _interrupted("aborted", errors.EXIT_FAILED)
        except click.UsageError as e:
            # one line, as every other error: the command, what was wrong, where to read more
            ctx = e.ctx
            where = ctx.command_path if ctx is not None else "postcopy"
            hint = f" (see '{where} --help')" if ctx is not None else ""
            return _fail(errors.EXIT_USAGE, f"{where.removeprefix('postcopy').strip() or 'usage'}: "
                                            f"{e.format_message()}{hint}")
        except click.ClickException as e:
            e.show()
            return errors.EXIT_FAILED
        except signals.Interrupted as e:
            return _fail(e.exit_code, str(e))
        except errors.PostcopyError as e:
            return _interrupted(str(e), e.exit_code)
        except KeyboardInterrupt:
            return _interrupted("interrupted", errors.EXIT_FAILED)
        except OSError as e:
            return _interrupted(str(e), errors.EXIT_FAILED)


def main() -> None:
    logging.basicConfig(format="postcopy: %(levelname)s: %(message)s", stream=sys.stderr)
    sys.exit(run())
