"""Fixtures of the test suite (helpers: tests/helpers.py)."""
import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors. This must be set before any
# @triton.jit function is created, i.e. before gsa_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poison_empty():
    """torch.empty and friends fill new memory with NaN, so an output element a kernel forgets to
    write shows up as NaN in the result."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: extra threads only contend (CI runs two workers on two cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


_NEEDS_CUDA = "needs a CUDA device"  # the skip reason of helpers.requires_cuda


def pytest_collection_modifyitems(config, items):
    """Tests that need a GPU carry the `cuda` marker too, so `pytest -m cuda` selects all of them."""
    for item in items:
        if any(m.kwargs.get("reason") == _NEEDS_CUDA for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
