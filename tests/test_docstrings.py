"""The runnable examples in the docstrings of every erasus module run and print what they say (modules are found
by walking the package, so a new module's examples are tested without an edit here)."""
import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import erasus

# the package's own folder (an editable install adds other entries to erasus.__path__); __main__ runs the CLI
MODULES = sorted(info.name for info in pkgutil.walk_packages([str(Path(erasus.__file__).parent)], "erasus.")
                 if not info.name.endswith(("._C", ".__main__")))
# the public entry points must show how they are called
MUST_HAVE_EXAMPLES = {"erasus.ops.kcenter", "erasus.ops.herding", "erasus.ops.kmeans", "erasus.ops.linear_grads",
                      "erasus.ops.grad_norms", "erasus.ops.fisher", "erasus.ops.last_layer", "erasus.unlearner",
                      "erasus.selectors.classic", "erasus.selectors.gradient", "erasus.settings"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), raise_on_error=False)
    assert result.failed == 0
    if name in MUST_HAVE_EXAMPLES:
        assert result.attempted > 0, f"{name} has no runnable example"


def test_the_walk_finds_the_modules():
    assert MUST_HAVE_EXAMPLES <= set(MODULES) and len(MODULES) > 40
