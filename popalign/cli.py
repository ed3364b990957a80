"""The ``popalign`` console script: one subcommand per pipeline stage.

Every module in :mod:`popalign.commands` is a subcommand. A command module defines

* ``HELP``: a one-line summary shown by ``popalign --help``;
* ``add_arguments(parser)``: its flags (keep imports light: ``--help`` must be fast);
* ``run(args) -> int``: the work, importing heavy libraries inside.

Errors the user can fix (bad files, bad flags) are raised as :class:`popalign.errors.UserError`
and printed as one line with a non-zero exit, without a traceback. Ctrl-C prints one line and exits
130, SIGTERM (a scheduler's preemption, ``kill``, ``timeout``) one line and 143: both stop the stage
through its cleanup, and the same command resumes.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import pkgutil
import signal
import sys

import popalign.commands
from popalign.errors import UserError
from popalign.signals import Terminated, lightning_interrupt, sigterm_interrupts


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after a flag's help, except where there is nothing to show: a required
    argument, a default of ``None`` (the help says what unset means), or a help text that already
    names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required or action.default is None or "(default" in text:
            return text
        return super()._get_help_string(action)


def unrecognized_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """argparse's "unrecognized arguments" message, with the closest of ``parser``'s flags for each
    unknown flag that has one (``--axis`` -> "did you mean --axes?")."""
    known = {s.lstrip("-"): s for s in parser._option_string_actions}  # dashes alone make "--x" like "--y"
    guesses: dict[str, str] = {}
    for arg in extras:
        flag = arg.split("=", 1)[0]
        if flag.startswith("-") and flag not in guesses:
            close = difflib.get_close_matches(flag.lstrip("-"), list(known), n=1)
            if close:
                guesses[flag] = known[close[0]]
    message = f"unrecognized arguments: {' '.join(extras)}"
    if len(guesses) == 1:
        return f"{message} (did you mean {next(iter(guesses.values()))}?)"
    if guesses:
        return f"{message} (did you mean {', '.join(f'{g} for {f}' for f, g in guesses.items())}?)"
    return message


class Parser(argparse.ArgumentParser):
    """The top-level parser: arguments no parser took are reported by the subcommand's parser, so the
    user sees that command's usage line and ``popalign COMMAND: error: ...``."""

    def parse_args(self, args=None, namespace=None):  # argparse's signature
        ns, extras = self.parse_known_args(args, namespace)
        parser = getattr(ns, "_parser", self)
        if extras:
            parser.error(unrecognized_message(parser, extras))
        empty = empty_argument(parser, ns)
        if empty:
            parser.error(f"argument {empty}: empty value (an unset shell variable?)")
        return ns


def empty_argument(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> str | None:
    """The first flag (or positional) given an empty string: no command takes one (``--out ""``
    would otherwise mean the current folder)."""
    for action in parser._actions:
        value = getattr(ns, action.dest, None)
        values = value if isinstance(value, list) else [value]
        if any(v == "" for v in values):
            return "/".join(action.option_strings) or action.dest
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="popalign",
        description="Population-level alignment of text-to-image diffusion models. Stages: "
        "prompts -> generate -> label -> build -> (python train.py fit) -> export -> evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"popalign {popalign.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(popalign.commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"popalign.commands.{info.name}")
        name = info.name.replace("_", "-")
        cmd = sub.add_parser(
            name,
            help=module.HELP,
            description=(module.__doc__ or module.HELP).strip(),
            formatter_class=HelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run, _parser=cmd)
    return parser


def _not_torchvision_advice(record: logging.LogRecord) -> bool:
    return "requires torchvision (not installed)" not in str(record.msg)


def quiet_torchvision_advice() -> None:
    """Drop transformers' advice to install torchvision (transformers >= 5 logs it once per
    image-processor class diffusers' pipelines name, falling back to the PIL backend). popalign needs
    no torchvision, so on every sampling stage it would be noise; transformers' other logs stay."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_not_torchvision_advice)


def main(argv: list[str] | None = None) -> int:
    """Run ``popalign ARGV``; returns the exit status (SIGTERM stops the stage as Ctrl-C does)."""
    quiet_torchvision_advice()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with sigterm_interrupts():
            return int(args._run(args) or 0)
    except UserError as err:
        print(f"popalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        return stopped(args.command, stop)
    except SystemExit as exit_:
        # Lightning (generate on several devices) answers an interruption with sys.exit(1)
        if not lightning_interrupt(exit_):
            raise
        return stopped(args.command, exit_.__context__)


def stopped(command: str, stop: KeyboardInterrupt) -> int:
    """Say in one line that ``command`` was stopped (by Ctrl-C, or by SIGTERM: :class:`Terminated`);
    returns the exit status, 128 + the signal's number."""
    # finished work is kept (stages write under temporary names): the same command resumes
    sigterm = isinstance(stop, Terminated)
    how = "stopped by SIGTERM" if sigterm else "interrupted"
    print(f"popalign {command}: {how}; run the same command again to resume", file=sys.stderr)
    return 128 + int(signal.SIGTERM if sigterm else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
