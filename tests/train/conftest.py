"""Fixtures of the training tests."""

import pytest


@pytest.fixture
def torch_one_thread():
    """torch on one thread for the test: tiny matmuls run faster alone than two threads fighting on
    a loaded machine."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
