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
from .commands._common import emit_json, json_request


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


# the error document's "kind" when the error names none more precise
_KINDS = {errors.EXIT_FAILED: "failed", errors.EXIT_USAGE: "usage", errors.EXIT_PROTOCOL: "protocol",
          errors.EXIT_DISCONNECTED: "disconnected"}


def _fail(code: int, message: str, error: BaseException | None = None, *, shown: bool = False) -> int:
    """The one way out of a failed command: one line on stderr and, under --json, one JSON document on
    stdout: {"error": {"code", "kind", "message"}} plus the figures the error carries."""
    if not shown:
        click.echo(f"postcopy: {message}", err=True)
    if json_request.given:
        kind = getattr(error, "kind", None) if getattr(error, "exit_code", code) == code else None
        doc = dict(getattr(error, "stats", None) or {})
        doc["error"] = {"code": code, "kind": kind or _KINDS.get(code, "failed"), "message": message}
        emit_json(doc)
    return code


def _interrupted(message: str, code: int, error: BaseException | None = None) -> int:
    # whatever a stop by a signal made fail, the cause is the signal
    stop = signals.interruption()
    if stop is not None:
        return _fail(stop.exit_code, str(stop), errors.with_stats(stop, getattr(error, "stats", None)))
    return _fail(code, message, error)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (no sys.exit, for tests and embedding)."""
    json_request.given = False
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
            # an option the parser refused comes before --json's own callback: look for it
            json_request.given |= "--json" in (sys.argv[1:] if argv is None else argv)
            return _fail(errors.EXIT_USAGE, f"{where.removeprefix('postcopy').strip() or 'usage'}: "
                                            f"{e.format_message()}{hint}", e)
        except click.ClickException as e:
            e.show()
            return _fail(errors.EXIT_FAILED, e.format_message(), e, shown=True)
        except signals.Interrupted as e:
            return _fail(e.exit_code, str(e), e)
        except errors.PostcopyError as e:
            return _interrupted(str(e), e.exit_code, e)
        except KeyboardInterrupt as e:
            return _interrupted("interrupted", errors.EXIT_FAILED, e)
        except OSError as e:
            return _interrupted(str(e), errors.EXIT_FAILED, e)


def main() -> None:
    logging.basicConfig(format="postcopy: %(levelname)s: %(message)s", stream=sys.stderr)
    sys.exit(run())
