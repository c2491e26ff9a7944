"""The examples in the public docstrings run and give what they show."""

import doctest
import importlib

import pytest

MODULES = ["mlo.linsolve", "mlo.hypergrad", "mlo.hypergrad.aid", "mlo.hypergrad.fd",
           "mlo.hypergrad.itd"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": importlib.import_module("torch")})
    assert result.attempted > 0 and result.failed == 0
