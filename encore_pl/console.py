"""The `encore-pl` command: every tool of the project under one name.

    encore-pl fit --config CONFIG.yaml               # = python scripts/train.py fit --config CONFIG.yaml
    encore-pl validate --config CONFIG.yaml          # = python scripts/train.py validate ...
    encore-pl patch apply|revert|show ...            # = python scripts/patch.py ...
    encore-pl benchmark --config CONFIG.yaml ...     # = python scripts/benchmark.py ...
    encore-pl plot RUN_DIR ...                       # = python scripts/plot_run.py ...
    encore-pl compare RUN_DIR ...                    # = python scripts/compare.py ...

`python -m encore_pl ...` is the same. Each subcommand is also a function taking the arguments
that follow its name, e.g. `fit(["--config", "configs/quickstart.yaml"])` (by default, those of
the command line). A subcommand imports its module only when it runs, so `encore-pl --help` starts
quickly.
"""

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

PROG = "encore-pl"


def fit(argv: Optional[Sequence[str]] = None) -> None:
    """Edit a model, then score the edits."""
    _lightning("fit", argv)


def validate(argv: Optional[Sequence[str]] = None) -> None:
    """Score a model without editing it."""
    _lightning("validate", argv)


def patch(argv: Optional[Sequence[str]] = None) -> None:
    """Apply, revert or show an edit patch."""
    from .patch_cli import main

    main(_after_name(argv), prog=f"{PROG} patch")


def benchmark(argv: Optional[Sequence[str]] = None) -> None:
    """Speed by phase, against the matmul rate."""
    from .benchmark import main

    main(_after_name(argv), prog=f"{PROG} benchmark")


def plot(argv: Optional[Sequence[str]] = None) -> list[Path]:
    """Figures of one or more runs (PNGs).

    Returns the files written."""
    from .plots import main

    return main(_after_name(argv), prog=f"{PROG} plot")


def compare(argv: Optional[Sequence[str]] = None) -> str:
    """Runs side by side in one Markdown table.

    Returns the table."""
    from .compare import main

    return main(_after_name(argv), prog=f"{PROG} compare")


def _after_name(argv: Optional[Sequence[str]]) -> list[str]:
    """A command's arguments: `argv`, or by default those of this process after the command's name."""
    return list(sys.argv[2:] if argv is None else argv)


def _lightning(subcommand: str, argv: Optional[Sequence[str]]) -> None:
    from .cli import main

    args = [subcommand, *_after_name(argv)]
    # the process's own command line is left for LightningCLI to read (given it as well, it warns)
    main(None if args == sys.argv[1:] else args, prog=PROG)


COMMANDS = {command.__name__: command for command in (fit, validate, patch, benchmark, plot, compare)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`encore-pl COMMAND ARGS...` (default: sys.argv): run COMMAND on ARGS."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog=PROG, description="Lifelong knowledge editing (ENCORE, MEMIT, AlphaEdit) on PyTorch Lightning.",
        epilog=f"`{PROG} <command> --help` shows the options of that command.")
    commands = parser.add_subparsers(dest="command", title="commands", required=True)
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.__doc__.splitlines()[0], add_help=False)
    # only the command's name is parsed here: the rest goes to the command untouched
    name = parser.parse_args(argv[:1]).command
    COMMANDS[name](argv[1:])
