"""Diffusion tests run single-threaded (tests/fixtures/threads.py): their tensors are tiny."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
