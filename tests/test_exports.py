import types

import pytest

import asyncbg
import asyncbg.testing


@pytest.mark.parametrize("module", [asyncbg, asyncbg.testing])
def test_all_is_sorted_and_complete(module: types.ModuleType) -> None:
    public = {
        name for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert module.__all__ == sorted(module.__all__)
    assert public - {"annotations"} <= set(module.__all__)
    for name in module.__all__:
        value = getattr(module, name)
        if isinstance(value, type) or callable(value):
            # users import asyncbg.X; the private module is an implementation detail
            assert value.__module__ == module.__name__, (name, value.__module__)


def test_version_is_the_one_in_pyproject() -> None:
    """pyproject.toml is the one source of the version; ``asyncbg.__version__`` reads it."""
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert asyncbg.__version__ == declared
