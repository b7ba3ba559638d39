"""postcopy: post-copy memory migration on Linux with userfaultfd.

A program's memory moves from a source host to a destination while the program
runs on the destination: userfaultfd catches each access to a page that has not
arrived, the destination asks the source for it over the return path and
installs it atomically.  The ``postcopy`` command (:mod:`postcopy_cli.cli`) and
its subcommands are built on :mod:`postcopy_cli.dest.serve` (destination),
:mod:`postcopy_cli.source.streamer` and :mod:`postcopy_cli.source.live` (source),
:mod:`postcopy_cli.codec` (the wire format) and :mod:`postcopy_cli.uffd`
(the userfaultfd binding).
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__: str = _version("postcopy")
except PackageNotFoundError:    # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
