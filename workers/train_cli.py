"""``seemly train run | versions | promote | rollback`` (``schedule`` lives in :mod:`workers.scheduler`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from seemly.config import Settings, get_settings
from seemly.db.models import TrainingReason
from seemly.engines.base import configured_engine_spec
from seemly.learning import versions
from workers.train import TrainingError, TrainOptions, resolve_project, run_training


def configure(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
    command = words[-1]
    parser.add_argument("--project", required=True, help="project name or Label Studio project id")
    if command == "run":
        parser.add_argument(
            "--reason", choices=[r.value for r in TrainingReason], default=TrainingReason.BUTTON.value
        )
        parser.add_argument("--epochs", type=int, help="override the project's epochs")
        parser.add_argument(
            "--workers", type=int, help="Ray Train workers (default SEEMLY_TRAIN_NUM_WORKERS)"
        )
        parser.add_argument("--no-label-model", action="store_true", help="do not refresh the label model")
    elif command == "promote":
        parser.add_argument("--version", required=True, help="version name (see seemly train versions)")


def run(args: argparse.Namespace, words: tuple[str, ...]) -> int:
    command = words[-1]
    settings = get_settings()
    try:
        if command == "run":
            return _cli_run(args, settings)
        return _cli_registry(args, command, settings)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _cli_run(args: argparse.Namespace, settings: Settings) -> int:
    options = TrainOptions(refresh_label_model=not args.no_label_model, num_workers=args.workers)
    if args.epochs is not None:
        if args.epochs < 1:
            raise TrainingError("--epochs must be at least 1")
        options.fit["epochs"] = args.epochs
    result = run_training(
        args.project,
        reason=args.reason,
        requested_by="cli",
        settings=settings,
        options=options,
        progress=lambda message: print(message, flush=True),
    )
    verdict = "promoted" if result.promoted else "not promoted"
    print(f"{result.version.name}: {verdict} — {result.decision.reason}")
    if result.failed_images:
        print(f"{len(result.failed_images)} images could not be used: seemly jobs --job {result.job_id}")
    return 0


def _cli_registry(args: argparse.Namespace, command: str, settings: Settings) -> int:
    from seemly.db.session import make_engine

    db = make_engine(settings.database_url)
    try:
        project_id, name, _ = resolve_project(db, args.project)
        try:
            if command == "versions":
                print(
                    versions_table(versions.list_versions(db, project_id))
                    or f"project {name} has no versions yet"
                )
            elif command == "promote":
                info = versions.get_by_name(db, args.version)
                if info is None or info.project_id != project_id:
                    raise TrainingError(
                        f"project {name} has no version named {args.version!r} (seemly train versions)"
                    )
                versions.promote(db, info.id)
                print(f"project {name} now serves {info.name}")
            elif command == "rollback":
                back = versions.rollback(db, project_id)
                base = configured_engine_spec(settings)[0]
                print(f"project {name} now serves {back.name if back else f'the base {base} engine'}")
        except versions.VersionError as exc:
            raise TrainingError(str(exc)) from None
    finally:
        db.dispose()
    return 0


def versions_table(rows: Sequence[versions.VersionInfo]) -> str:
    """A plain-text table: name, parent, NoC@90 / mIoU, gate decision, promoted."""
    if not rows:
        return ""
    by_id = {r.id: r.name for r in rows}
    lines = [("name", "parent", "NoC@90", "mIoU", "decision", "promoted")]
    for r in rows:
        noc = r.metrics.get("noc90")
        miou = r.metrics.get("miou")
        decision = (r.decision or {}).get("reason", "—")
        lines.append(
            (
                r.name,
                by_id.get(r.parent_id, "—") if r.parent_id else "—",
                f"{noc:.2f}" if isinstance(noc, int | float) else "—",
                f"{miou:.3f}" if isinstance(miou, int | float) else "—",
                decision,
                "yes" if r.promoted else "",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line[:5])) + "  " + line[5] for line in lines
    ).rstrip()
