"""The docstring ``Example:`` blocks of the core modules run, so they cannot drift from the code."""
import doctest
import importlib

import pytest

#: modules whose examples are self-contained (others show calls that need data or a checkpoint)
MODULES = ["hybrid.core.feature_map", "hybrid.core.errors", "hybrid.core.config", "hybrid.core.backbones.config",
           "hybrid.pretrain.layout", "hybrid.bootstrap", "hybrid.ctr_models._config"]


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
