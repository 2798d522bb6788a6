"""Shared test set-up. Each real service has its own fixture module under tests/fixtures/."""

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.s3",
    "tests.fixtures.label_studio",
    "tests.fixtures.ray",
]
