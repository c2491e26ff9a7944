import pytest
import torch
from torch import nn

import mlo

# Building the first optimizer of a process imports torch's compiler stack (~2 s); pay it once at
# collection so that no single test carries it.
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


@pytest.fixture(autouse=True)
def empty_registry():
    """Give every test an empty default registry, so levels of one test never leak into another."""
    mlo.registry.clear()
    yield
    mlo.registry.clear()


@pytest.fixture
def parts():
    """Return a factory of `@mlo.level` keywords around a fresh tiny nn.Linear and its SGD."""
    def make(hypergrad=None, size=2, lr=0.1, **options):
        torch.manual_seed(0)
        module = nn.Linear(size, 1)
        optimizer = torch.optim.SGD(module.parameters(), lr=lr)
        return dict(module=module, optimizer=optimizer, hypergrad=hypergrad, **options)
    return make
