"""The installed package: the compiled extension is there, the Triton sources ship inside erasus."""
import importlib.metadata
import importlib.util

import pytest

import erasus


def test_compiled_extension_is_installed_and_threaded():
    from erasus import _C

    assert _C.openmp is True
    assert _C.max_threads() >= 1


def test_triton_sources_ship_as_erasus_kernels_only():
    listed = importlib.metadata.files("erasus")
    assert listed, "the installed erasus lists no files (no RECORD): nothing below would be checked"
    files = [str(f) for f in listed]
    assert any(f.replace("\\", "/").startswith("erasus/") for f in files), files  # the package's own files
    assert not any(f.startswith("kernels/") for f in files), "a top-level 'kernels' package was installed"
    spec = importlib.util.find_spec("erasus.kernels")
    assert spec is not None and spec.origin.endswith("__init__.py")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    import erasus.kernels.herding
    import erasus.kernels.kcenter  # noqa: F401


def test_every_error_derives_from_erasus_error():
    from erasus import errors

    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == errors.__name__:
            assert issubclass(obj, erasus.ErasusError)
