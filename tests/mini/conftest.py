import pytest
import torch


@pytest.fixture()
def one_thread():
    # On 2 shared cores, OpenMP's spinning threads slow a step ~15x when anything else runs.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
