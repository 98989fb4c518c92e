"""Argument types and checks shared by the ``slao`` subcommands: every bad value exits 2 with one
line naming the flag."""

from __future__ import annotations

import argparse
import math
import os
import typing

from slao_kernels.continual.strategies import STRATEGIES

# --------------------------------------------------------------------------- argument types
# argparse turns an ArgumentTypeError into "argument --flag: <message>", exit status 2.


def _int_at_least(low: int):
    """An argparse ``type``: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _strategy_option(strategy: str, key: str):
    """An argparse ``type`` for a strategy option that has a flag of its own (``--lam``): the text
    read by the declared type of the option's config field, and range-checked."""
    config = STRATEGIES[strategy].config

    def parse(text: str):
        try:
            return config.parse_option(key, text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {config.accepts(key)}, got {text!r}") from None

    parse.__name__ = f"{strategy} option {key}"
    return parse


def _strategy_choices(strategy: str, key: str) -> tuple:
    """The values of a strategy option declared as a ``Literal`` (argparse ``choices``)."""
    return typing.get_args(STRATEGIES[strategy].config.option_types()[key])


def _strategy_options(args) -> dict:
    """The options of ``--strategy``: slao's --lam/--init/--merge (typed by argparse) and every
    --option KEY=VALUE, its value read by the declared type of the option's config field.

    Raises:
        UsageError: naming the option, what it accepts and what was given.
    """
    config = STRATEGIES[args.strategy].config
    names = config.option_names()
    options = {k: v for k, v in (("lam", args.lam), ("init", args.init), ("merge", args.merge)) if v is not None}
    if options and args.strategy != "slao":
        raise UsageError(f"--lam/--init/--merge are options of the slao strategy, not of --strategy "
                         f"{args.strategy}; its options (--option KEY=VALUE): {names}")
    pairs = []
    for item in args.option:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option takes KEY=VALUE, got {item!r}")
        pairs.append((key, text))
    unknown = sorted({key for key, _ in pairs} - set(names))
    if unknown:
        raise UsageError(f"--option: strategy {args.strategy!r} has no option(s) {unknown}; its options: {names}")
    for key, text in pairs:
        try:
            options[key] = config.parse_option(key, text)
        except ValueError as e:
            raise UsageError(f"--strategy {args.strategy} with {key}={text}: {e}") from None
    return options


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``slao run: error: argument --rank: ...``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _check_output_file(flag: str, path: str | None) -> None:
    """A file the command writes at its end: refused now if it cannot be written there."""
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: expected a file path in an existing directory, got "
                         + ("a directory" if os.path.isdir(path) else f"a path under {parent}, which does not exist"))


class UsageError(Exception):
    """Bad command-line input: printed without a traceback, exit status 2."""


_POSITIVE = _int_at_least(1)
_NON_NEGATIVE = _int_at_least(0)


def _add_task_args(p) -> None:
    p.add_argument("--data", default=None, help="task directory in the CL_Benchmark layout "
                   "(<task>/train.json, test.json, labels.json); default: built-in tasks (see --order)")
    p.add_argument("--order", default=None, help="task order: comma-separated names or a named order "
                   "(order1..order4); default: every task")
    p.add_argument("--train-size", type=_POSITIVE, default=None,
                   help="generated tasks only: training rows per task (default 256)")
    p.add_argument("--test-size", type=_int_at_least(2), default=None,
                   help="generated tasks only: test rows per task (default 100; slao demo: 50)")
    p.add_argument("--data-seed", type=_NON_NEGATIVE, default=None,
                   help="generated tasks only: seed of the rows (default 0)")
    p.add_argument("--max-test", type=_POSITIVE, default=None,
                   help="evaluate on at most this many test rows per task")
    p.add_argument("--eval-batch-size", type=_POSITIVE, default=16)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
