"""``seemly labels train``: (re)train a project's label model from its stored masks.

Reads the project's human masks (annotations and corrections) from the database, their images
through the configured storage, fits the label model (:mod:`seemly.engines.label_model`), writes it
to ``--out`` (default ``file://$SEEMLY_HOME/label_models/project-<id>.npz``) and points the project at
it (``projects.settings["label_model"]``), where the backend picks it up within a minute.

    seemly labels train --ls-project 3
    seemly labels train --project 1 --out s3://models/labels/project-1.npz
"""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--project", type=int, help="seemly project id (projects.id)")
    which.add_argument("--ls-project", type=int, help="Label Studio project id")
    parser.add_argument("--out", default=None, help="artifact URI (file:// or s3://)")
    parser.add_argument("--engine", default="classic", help="engine whose proposals the model scores")
    parser.add_argument("--max-images", type=int, default=200, help="learn from at most the newest N images")
    parser.add_argument(
        "--no-record", action="store_true", help="write the model, leave the project as it is"
    )


def run(args: argparse.Namespace, words: tuple[str, ...] = ()) -> int:
    from sqlalchemy import select

    from seemly.config import get_settings
    from seemly.db.models import Project
    from seemly.db.session import make_engine
    from seemly.engines.base import create_engine
    from seemly.engines.label_model import (
        LabelModelError,
        default_label_model_uri,
        label_model_storage,
        record_label_model,
        train_label_model,
    )

    settings = get_settings()
    engine_db = make_engine(settings.database_url or None)
    with engine_db.connect() as conn:
        if args.project is not None:
            project_id = conn.execute(select(Project.id).where(Project.id == args.project)).scalar()
        else:
            project_id = conn.execute(
                select(Project.id).where(Project.ls_project_id == args.ls_project)
            ).scalar()
    if project_id is None:
        print(
            f"no such project: {args.project or f'Label Studio project {args.ls_project}'}", file=sys.stderr
        )
        return 2
    storage = label_model_storage(settings)
    try:
        model = train_label_model(
            engine_db,
            int(project_id),
            storage=storage,
            engine=create_engine(args.engine),
            max_images=args.max_images,
        )
    except LabelModelError as exc:
        print(f"cannot train: {exc}", file=sys.stderr)
        return 1
    uri = args.out or default_label_model_uri(int(project_id), settings)
    model.save(uri, storage)
    if not args.no_record:
        record_label_model(engine_db, int(project_id), uri, model)
    counts = ", ".join(f"{label} {n}" for label, n in sorted(model.examples.items()))
    print(
        f"label model {model.version} for project {project_id}: {counts} "
        f"({model.meta['images']} images, {model.meta['samples']} samples) -> {uri}"
    )
    return 0
