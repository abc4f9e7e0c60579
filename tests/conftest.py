"""Shared test setup. Real services are started once per session by the fixture plugins below."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.slurm",
    "tests.fixtures.fashion_mnist",
    "tests.fixtures.threads",
]
