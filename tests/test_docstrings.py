"""The runnable examples in the public docstrings run and print what they say."""
import doctest
import importlib

import pytest

MODULES = ["erasus.ops.kcenter", "erasus.ops.herding", "erasus.ops.kmeans", "erasus.selectors.classic",
           "erasus.ops.linear_grads", "erasus.ops.grad_norms", "erasus.ops.fisher", "erasus.ops.last_layer",
           "erasus.selectors.gradient", "erasus.selectors.features", "erasus.losses.token", "erasus.unlearner",
           "erasus.metrics.lm", "erasus.integrations.trainer", "erasus.settings",
           "erasus.ops._backend", "erasus.strategies.elm"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
