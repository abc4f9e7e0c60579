"""Diffusion tests run single-threaded: their tensors are tiny, and OpenMP threads spinning on two shared,
busy cores made them 30-50x slower."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
