#!/usr/bin/env python3
"""Generate the man pages from the click definitions, so they cannot drift.

    python3 man/generate.py            write man/postcopy.1 and man/postcopy-<command>.1
    python3 man/generate.py --check    exit 1, naming the stale files, if any differs

The output is deterministic (no dates): the same click definitions always give
the same bytes.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys

import click

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from postcopy_cli import errors  # noqa: E402
from postcopy_cli.cli import cli  # noqa: E402

PROG = "postcopy"
SECTION = "1"
MANUAL = "User Commands"

EXIT_STATUS = [
    (errors.EXIT_OK, "success"),
    (errors.EXIT_FAILED, "the operation failed or the host cannot do it"),
    (errors.EXIT_USAGE, "usage error (bad options or arguments)"),
    (errors.EXIT_PROTOCOL, "protocol error from the peer"),
    (errors.EXIT_DISCONNECTED, "the peer disconnected and could not be recovered"),
]


# EXAMPLES of each page: (what it does, shell lines). Every one runs as written, in an
# empty directory on a host where `postcopy probe` passes (tests/test_man.py runs them).
_RESTORE = ("head -c 64M /dev/urandom > vm.mem",
            "postcopy serve-dest --listen tcp:127.0.0.1:4444 --uffd-socket /tmp/uffd.sock &",
            "postcopy workload touch --size 64M --attach /tmp/uffd.sock --image vm.mem --order random &",
            "postcopy migrate --to tcp:127.0.0.1:4444 --image vm.mem",
            "wait")
_LIVE = ("postcopy serve-dest --listen tcp:127.0.0.1:4445 --uffd-socket /tmp/dst.sock &",
         "postcopy workload incoming --mem 64M --attach /tmp/dst.sock --report-after 1 &",
         "postcopy migrate --attach /tmp/src.sock --to tcp:127.0.0.1:4445 --postcopy-after 1 --kill-source &",
         "postcopy workload run --mem 64M --attach /tmp/src.sock --warmup-passes 1",
         "wait")
_WORKSET = ("head -c 64M /dev/urandom > vm.mem",
            "postcopy serve-dest --listen tcp:127.0.0.1:4447 --uffd-socket /tmp/ws.sock --record-workset ws.bin &",
            "postcopy workload touch --size 64M --attach /tmp/ws.sock --image vm.mem --order function &",
            "postcopy migrate --to tcp:127.0.0.1:4447 --image vm.mem",
            "wait",
            "postcopy workset show ws.bin",
            "postcopy serve-dest --listen tcp:127.0.0.1:4447 --uffd-socket /tmp/ws.sock &",
            "postcopy workload touch --size 64M --attach /tmp/ws.sock --image vm.mem --order function --seed 2 &",
            "postcopy migrate --to tcp:127.0.0.1:4447 --image vm.mem --workset ws.bin",
            "wait")
EXAMPLES: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "": [
        ("Check that this host can do post-copy, then run every migration case over loopback:",
         ("postcopy probe && postcopy selftest",)),
        ("Restore a 64 MiB image lazily into a program that touches every page:", _RESTORE),
    ],
    "probe": [
        ("The host check, as a table on a terminal and as plain lines in a pipe:", ("postcopy probe",)),
        ("The same report as one JSON document:", ("postcopy probe --json > probe.json",)),
    ],
    "serve-dest": [
        ("Serve an attached program's memory from an image (destination, program, source):", _RESTORE),
        ("Receive into serve-dest's own memory and write the statistics to a file:",
         ("head -c 16M /dev/urandom > vm.mem",
          "postcopy serve-dest --listen tcp:127.0.0.1:4446 --ram mem=16M --stats stats.json &",
          "postcopy migrate --to tcp:127.0.0.1:4446 --image vm.mem",
          "wait")),
    ],
    "migrate": [
        ("Lazy restore of an image (`migrate --image`):", _RESTORE),
        ("Record the pages a restored program faults on, then send them first in the next restore:", _WORKSET),
        ("Live migration of a running program (`migrate --attach`), all four processes on one host:", _LIVE),
    ],
    "send-discards": [
        ("Pages 3, 7 to 9 and 100 to 163 of block mem as QEMU's POSTCOPY_RAM_DISCARD commands, in hex:",
         ("postcopy send-discards --block mem --pages 3,7-9,100-163",)),
        ("The same as JSON byte ranges, and as raw bytes in a file:",
         ("postcopy send-discards --block mem --pages 3,7-9,100-163 --format json",
          "postcopy send-discards --block mem --pages 3,7-9,100-163 --format raw -o discards.bin")),
    ],
    "selftest": [
        ("Every case with 64 MiB each:", ("postcopy selftest",)),
        ("Only the live migration, with 16 MiB, as JSON:",
         ("postcopy selftest --case live-migration --size 16M --json > selftest.json",)),
    ],
    "workset": [
        ("Record a working set in one restore, look at it, replay it in the next:", _WORKSET),
    ],
    "tls-creds": [
        ("Credentials for a destination called localhost, then a restore with TLS on every connection "
         "(in real use, copy ca-cert.pem and the server files to the destination, ca-cert.pem and the client "
         "files to the source):",
         ("postcopy tls-creds create pki --hostname localhost --ip 127.0.0.1",
          "head -c 16M /dev/urandom > vm.mem",
          "postcopy serve-dest --listen tcp:127.0.0.1:4447 --ram mem=16M --tls-creds pki &",
          "postcopy migrate --to tcp:127.0.0.1:4447 --image vm.mem --tls-creds pki",
          "wait")),
    ],
    "workload": [
        ("workload touch as the program of a lazy restore:", _RESTORE),
        ("workload run on the source and workload incoming on the destination of a live migration:", _LIVE),
    ],
}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("postcopy")
    except Exception:
        return ""


def esc(text: str) -> str:
    """Escape text for roff: backslashes, hyphens, and control characters at line starts."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def bold(text: str) -> str:
    return f"\\fB{esc(text)}\\fR"


def paragraphs(help_text: str | None) -> list[tuple[bool, str]]:
    """Split click help into (verbatim, text) paragraphs; click's \\b marks a verbatim block."""
    text = inspect.cleandoc(help_text or "")
    text = text.split("\f", 1)[0]  # click: text after \f is not shown
    out = []
    for block in text.split("\n\n"):
        block = block.strip("\n")
        if not block.strip():
            continue
        if block.startswith("\b"):
            out.append((True, block[1:].lstrip("\n")))
        else:
            out.append((False, " ".join(line.strip() for line in block.splitlines())))
    return out


def render_paragraphs(help_text: str | None) -> list[str]:
    lines = []
    for i, (verbatim, text) in enumerate(paragraphs(help_text)):
        if i:
            lines.append(".PP")
        if verbatim:
            lines += [".nf", esc(text), ".fi"]
        else:
            lines.append(esc(text))
    return lines


def short_help(cmd: click.Command) -> str:
    text = cmd.get_short_help_str(limit=200).strip()
    return text.rstrip(".") or "(no description)"


def header(name: str) -> list[str]:
    ver = _version()
    source = f"{PROG} {ver}".strip()
    return [
        f'.\\" Generated by man/generate.py from the click definitions; do not edit.',
        f'.TH "{name.upper()}" "{SECTION}" "" "{source}" "{MANUAL}"',
    ]


def options_section(cmd: click.Command, ctx: click.Context) -> list[str]:
    lines = []
    args = []
    for param in cmd.get_params(ctx):
        if isinstance(param, click.Argument):
            args.append(param)
            continue
        record = param.get_help_record(ctx)
        if record is None:  # hidden
            continue
        opts, help_text = record
        lines += [".TP", bold(opts), esc(help_text) if help_text else ""]
    if args:
        out = [".SH ARGUMENTS"]
        for a in args:
            out += [".TP", bold(a.make_metavar(ctx) if _takes_ctx(a) else a.make_metavar()),
                    esc(getattr(a, "help", None) or ("required" if a.required else "optional"))]
        lines = out + ([".SH OPTIONS"] + lines if lines else [])
    elif lines:
        lines = [".SH OPTIONS"] + lines
    return [line for line in lines if line != ""]


def _takes_ctx(param: click.Parameter) -> bool:
    try:
        return "ctx" in inspect.signature(param.make_metavar).parameters
    except (TypeError, ValueError):
        return False


def examples(name: str) -> list[str]:
    lines = [".SH EXAMPLES"] if EXAMPLES.get(name) else []
    for i, (what, commands) in enumerate(EXAMPLES.get(name, [])):
        lines += ([".PP"] if i else []) + [esc(what), ".PP", ".nf", ".RS 4",
                                           *(esc(c) for c in commands), ".RE", ".fi"]
    return lines


def subcommands_section(group: click.Group, ctx: click.Context) -> list[str]:
    """Each subcommand of a group: its synopsis, description and options."""
    lines = [".SH COMMANDS"]
    for sub_name in sorted(group.list_commands(ctx)):
        sub = group.get_command(ctx, sub_name)
        if sub is None or sub.hidden:
            continue
        sub_ctx = click.Context(sub, info_name=sub_name, parent=ctx, **(sub.context_settings or {}))
        lines += [".SS " + esc(f"{ctx.command_path} {sub_name} " + " ".join(sub.collect_usage_pieces(sub_ctx)))]
        lines += render_paragraphs(sub.help) or [esc(short_help(sub))]
        lines += [".PP", "Options:"]
        for param in sub.get_params(sub_ctx):
            # arguments are in the usage line (newer click gives them a help record too)
            record = None if isinstance(param, click.Argument) else param.get_help_record(sub_ctx)
            if record is not None:
                lines += [".TP", bold(record[0])] + ([esc(record[1])] if record[1] else [])
    return lines


def exit_status() -> list[str]:
    lines = [".SH EXIT STATUS"]
    for code, text in EXIT_STATUS:
        lines += [".TP", bold(str(code)), esc(text)]
    return lines


def root_context(group: click.Group) -> click.Context:
    return click.Context(group, info_name=PROG, **(group.context_settings or {}))


def page_for_group(group: click.Group) -> str:
    ctx = root_context(group)
    pieces = " ".join(group.collect_usage_pieces(ctx))
    lines = header(PROG)
    lines += [".SH NAME", f"{PROG} \\- {esc(short_help(group))}",
              ".SH SYNOPSIS", f"{bold(PROG)} {esc(pieces)}",
              ".SH DESCRIPTION"]
    lines += render_paragraphs(group.help)
    lines += options_section(group, ctx)
    lines.append(".SH COMMANDS")
    for name in sorted(group.list_commands(ctx)):
        sub = group.get_command(ctx, name)
        if sub is None or sub.hidden:
            continue
        lines += [".TP", bold(f"{PROG} {name}"),
                  f"{esc(short_help(sub))}. See \\fB{PROG}\\-{esc(name)}\\fR(1)."]
    lines += exit_status()
    lines += examples("")
    lines += [".SH SEE ALSO"]
    subs = [n for n in sorted(group.list_commands(ctx)) if not group.get_command(ctx, n).hidden]
    lines.append(",\n".join(f"\\fB{PROG}\\-{esc(n)}\\fR(1)" for n in subs))
    return "\n".join(lines) + "\n"


def page_for_command(group: click.Group, name: str, cmd: click.Command) -> str:
    parent = root_context(group)
    ctx = click.Context(cmd, info_name=name, parent=parent, **(cmd.context_settings or {}))
    full = f"{PROG}-{name}"
    pieces = " ".join(cmd.collect_usage_pieces(ctx))
    lines = header(full)
    lines += [".SH NAME", f"{esc(full)} \\- {esc(short_help(cmd))}",
              ".SH SYNOPSIS", f"{bold(f'{PROG} {name}')} {esc(pieces)}",
              ".SH DESCRIPTION"]
    lines += render_paragraphs(cmd.help) or [esc(short_help(cmd))]
    lines += options_section(cmd, ctx)
    if isinstance(cmd, click.Group):
        lines += subcommands_section(cmd, ctx)
    lines += exit_status()
    lines += examples(name)
    lines += [".SH SEE ALSO", f"\\fB{PROG}\\fR(1)"]
    return "\n".join(lines) + "\n"


def generate() -> dict[str, str]:
    """{file name: contents} for every page."""
    pages = {f"{PROG}.{SECTION}": page_for_group(cli)}
    ctx = root_context(cli)
    for name in sorted(cli.list_commands(ctx)):
        cmd = cli.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        pages[f"{PROG}-{name}.{SECTION}"] = page_for_command(cli, name, cmd)
    return pages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate the postcopy man pages from the click definitions.")
    ap.add_argument("--check", action="store_true", help="exit 1 naming stale pages instead of writing")
    ap.add_argument("--dir", default=HERE, help="output directory (default: this script's directory)")
    args = ap.parse_args(argv)

    pages = generate()
    existing = {f for f in os.listdir(args.dir)
                if f.endswith(f".{SECTION}") and (f == f"{PROG}.{SECTION}" or f.startswith(f"{PROG}-"))}
    stale = []
    for fname, text in pages.items():
        path = os.path.join(args.dir, fname)
        try:
            with open(path, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            stale.append(fname)
            if not args.check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    orphans = sorted(existing - set(pages))
    if args.check:
        if stale or orphans:
            for fname in stale:
                print(f"man/{fname} is stale: run `python3 man/generate.py`", file=sys.stderr)
            for fname in orphans:
                print(f"man/{fname} has no command any more: delete it", file=sys.stderr)
            return 1
        return 0
    for fname in orphans:
        os.remove(os.path.join(args.dir, fname))
    for fname in stale:
        print(f"wrote man/{fname}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
