import os
import sys
import warnings

import pytest
import torch

# Two xdist workers on two cores: one thread each avoids oversubscription.
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_configure(config):
    warnings.filterwarnings("ignore", category=FutureWarning)
