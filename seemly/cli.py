"""The ``seemly`` command line.

Each command lives in its own module exposing ``configure(parser)`` and ``run(args) -> int``; this
file only lists them and imports the chosen one lazily, so ``seemly --help`` stays fast and a
command's heavy dependencies (Ray, torch) load only when that command runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# command words -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("demo",): ("seemly.commands.demo", "segment the bundled sample images end to end and write overlays"),
    ("db", "upgrade"): ("seemly.db.migrate", "migrate the database to the newest schema"),
    ("db", "downgrade"): ("seemly.db.migrate", "migrate the database down to a revision"),
    ("bench", "interactive"): ("seemly.bench.interactive", "NoC benchmark of interactive engines"),
    ("bench", "everything"): ("seemly.bench.everything", "segment-everything proposals vs ground truth"),
    ("bench", "reference"): ("seemly.bench.reference", "reference-image prompts on pairs with known answers"),
    ("labels", "train"): ("seemly.commands.labels", "train a project's label model from its stored masks"),
    ("ls", "connect"): ("plugin.connect", "set up a Label Studio project (config, ML backend, S3, hooks)"),
    ("backend",): ("backend.cli", "run the Label Studio ML backend"),
    ("serve",): ("workers.serve_cli", "deploy the segmenter on Ray Serve"),
    ("presegment",): (
        "workers.presegment",
        "segment every image under s3://bucket/prefix or file:///dir/ (Ray Data)",
    ),
    ("jobs",): ("workers.jobs_cli", "list jobs with their counts, and the failed items of one job"),
    ("export", "coco"): ("workers.export", "export a project's masks as COCO instances JSON"),
    ("train", "run"): ("workers.train_cli", "fine-tune a project's model on Ray Train, gate it, register it"),
    ("train", "schedule"): (
        "workers.scheduler",
        "start trainings when corrections, time or the Train button say so",
    ),
    ("train", "versions"): (
        "workers.train_cli",
        "a project's model versions: parent, metrics, decision, promoted",
    ),
    ("train", "promote"): ("workers.train_cli", "serve a project's version NAME from now on"),
    ("train", "rollback"): (
        "workers.train_cli",
        "serve the current version's parent again (or the base engine)",
    ),
    ("ls", "import-predictions"): (
        "workers.ls_predictions",
        "import a project's masks into Label Studio as predictions",
    ),
    ("al", "rank"): ("workers.active_learning", "rank a project's unlabelled images by model uncertainty"),
    ("al", "next"): ("workers.active_learning", "list the most uncertain unlabelled tasks to annotate next"),
}


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, tuple[str, ...]]]:
    parser = argparse.ArgumentParser(prog="seemly", description="AI-assisted segmentation for Label Studio.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    targets: dict[str, tuple[str, ...]] = {}
    for words, (_module, help_text) in COMMANDS.items():
        if len(words) == 1:
            sub = top.add_parser(words[0], help=help_text)
        else:
            if words[0] not in groups:
                group_parser = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group_parser.add_subparsers(
                    dest=f"{words[0]}_command", metavar="SUBCOMMAND"
                )
            sub = groups[words[0]].add_parser(words[1], help=help_text)
        key = " ".join(words)
        sub.set_defaults(_command_key=key)
        targets[key] = words
    return parser, targets


def _setup_logging(level: int) -> None:
    """Text or JSON lines (``SEEMLY_LOG_FORMAT``) with the request id; see :mod:`seemly.log_setup`."""
    from pydantic import ValidationError

    from seemly.config import get_settings
    from seemly.log_setup import settings_secrets, setup_logging

    try:
        settings = get_settings()
    except ValidationError:  # the command itself reports invalid settings, with their names
        setup_logging(level, "text")
        return
    setup_logging(level, settings.log_format, lambda: settings_secrets(settings))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, _ = _build_parser()
    # Parse once to find the command, then let the command add its own arguments and parse again.
    wants_help = any(a in ("-h", "--help") for a in argv)
    try:
        known, _rest = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    except SystemExit as exc:
        return int(exc.code or 0)
    key = getattr(known, "_command_key", None)
    if key is None:
        parser.print_help()
        return 0 if wants_help else 2
    words = tuple(key.split())
    module = importlib.import_module(COMMANDS[words][0])
    full_parser = argparse.ArgumentParser(prog=f"seemly {key}", description=COMMANDS[words][1])
    configure = getattr(module, "configure", None)
    if configure is not None:
        configure(full_parser, words)
    rest = [a for a in argv if a not in ("-v", "--verbose")]
    args = full_parser.parse_args(rest[len(words) :])
    args.verbose = known.verbose or any(a in ("-v", "--verbose") for a in argv)
    _setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(module.run(args, words) or 0)
    except Exception as exc:
        if _missing_schema(exc):  # a database nobody migrated: say how, not a stack trace
            print(
                f"error: the database has no seemly tables yet: run `seemly db upgrade` ({exc.args[0]})",
                file=sys.stderr,
            )
            return 2
        raise


def _missing_schema(exc: BaseException) -> bool:
    """Whether ``exc`` is a query on a table that does not exist (SQLite or Postgres)."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    if not isinstance(exc, OperationalError | ProgrammingError):
        return False
    text = str(exc.orig)
    return "no such table" in text or ("relation" in text and "does not exist" in text)


if __name__ == "__main__":
    raise SystemExit(main())
