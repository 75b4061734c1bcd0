"""The public names: ``__all__`` is sorted, complete, and every name in it exists."""

from __future__ import annotations

from types import ModuleType

import starlette_alchemy
from starlette_alchemy import queries, testing


def test_all_is_sorted_and_complete() -> None:
    public = {
        name
        for name, value in vars(starlette_alchemy).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    assert starlette_alchemy.__all__ == sorted(starlette_alchemy.__all__)
    assert set(starlette_alchemy.__all__) == public


def test_every_exported_name_is_defined_in_the_package() -> None:
    for name in starlette_alchemy.__all__:
        assert getattr(starlette_alchemy, name).__module__.startswith("starlette_alchemy.")


def test_the_testing_module_exports_what_it_defines() -> None:
    assert testing.__all__ == sorted(testing.__all__)
    defined = {
        name
        for name, value in vars(testing).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == testing.__name__
    }
    # The query counting lives in a module of its own, and is part of the kit.
    assert set(testing.__all__) == defined | set(queries.__all__)
