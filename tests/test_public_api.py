"""The public surface is deliberate: what __all__ names, where those names
say they live, and which objects only the library makes."""

from __future__ import annotations

import types

import pytest

import boxfiles
import boxfiles.testing


@pytest.mark.parametrize("module", [boxfiles, boxfiles.testing])
def test_every_public_name_says_where_to_import_it_from(module: types.ModuleType) -> None:
    public = {name for name in dir(module) if not name.startswith("_")}
    submodules = {name for name in public if isinstance(getattr(module, name), types.ModuleType)}
    assert sorted(public - submodules) == sorted(module.__all__)
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, (type, types.FunctionType)):
            assert obj.__module__ == module.__name__, name


def test_errors_name_their_public_module_in_tracebacks() -> None:
    assert repr(boxfiles.NotFound) == "<class 'boxfiles.NotFound'>"


@pytest.mark.parametrize(
    ("cls", "made_by"),
    [
        (boxfiles.FilesClient, "boxfiles.open_client()"),
        (boxfiles.testing.FaultServer, "open_fault_server"),
    ],
)
def test_objects_only_the_library_makes_have_no_public_constructor(cls: type, made_by: str) -> None:
    with pytest.raises(TypeError, match="no public constructor") as caught:
        cls()
    assert made_by in str(caught.value)
