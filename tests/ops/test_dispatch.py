import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import erasus.ops
from erasus import errors
from erasus.ops import _backend


def test_backends_reports_availability_and_reasons():
    report = erasus.ops.backends()
    assert set(report) == {"reference", "cpp", "triton", "faiss"}
    assert report["reference"]["available"] is True
    assert report["cpp"]["available"] is True, report["cpp"]["reason"]  # the extension must have been built
    assert all(isinstance(v["reason"], str) and v["reason"] for v in report.values())


def test_default_on_cpu_is_the_compiled_backend():
    assert _backend.resolve("kcenter_greedy", ("reference", "cpp", "triton"), torch.device("cpu"), None) == "cpp"
    assert _backend.resolve("kmeans_coreset", ("reference", "faiss"), torch.device("cpu"), None) == "faiss"


def test_environment_variable_overrides_the_default(monkeypatch):
    torch.manual_seed(0)  # fixed data, whatever ran before
    monkeypatch.setenv("ERASUS_BACKEND", "reference")
    assert _backend.resolve("herding", ("reference", "cpp"), torch.device("cpu"), None) == "reference"
    # an op without that backend keeps its own default
    monkeypatch.setenv("ERASUS_BACKEND", "cpp")
    assert _backend.resolve("kmeans_coreset", ("reference", "faiss"), torch.device("cpu"), None) == "faiss"
    # the argument wins over the environment
    assert _backend.resolve("herding", ("reference", "cpp"), torch.device("cpu"), "reference") == "reference"
    monkeypatch.setenv("ERASUS_BACKEND", "fast")
    with pytest.raises(errors.InvalidInputError, match="ERASUS_BACKEND must be one of"):
        erasus.ops.herding(torch.randn(4, 2), 1)


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    torch.manual_seed(0)  # fixed data, whatever ran before
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("triton runs here")
    with pytest.raises(errors.BackendUnavailableError, match="triton"):
        erasus.ops.kcenter_greedy(torch.randn(4, 2), 1, backend="triton")
    monkeypatch.setenv("ERASUS_BACKEND", "triton")
    with pytest.raises(errors.BackendUnavailableError, match="ERASUS_BACKEND='triton'"):
        erasus.ops.herding(torch.randn(4, 2), 1)


def test_missing_backend_falls_back_to_reference_with_one_warning(monkeypatch):
    torch.manual_seed(0)  # fixed data, whatever ran before
    monkeypatch.setattr(_backend, "_probe", lambda name: (name == "reference", f"{name} missing (simulated)"))
    monkeypatch.setattr(_backend, "_warned", set())
    x = torch.randn(30, 5)
    with pytest.warns(RuntimeWarning, match="cpp backend is unavailable"):
        first = erasus.ops.kcenter_greedy(x, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = erasus.ops.herding(x, 4)  # same missing backend: no second warning
    assert torch.equal(first.indices, erasus.ops.kcenter_greedy(x, 4, backend="reference").indices)
    assert torch.equal(second, erasus.ops.herding(x, 4, backend="reference"))


def test_import_without_the_extension_and_triton_still_works():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["erasus._C"] = None   # as if the extension had not been built
        sys.modules["triton"] = None
        sys.modules["faiss"] = None
        import torch, erasus.ops
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = erasus.ops.kcenter_greedy(torch.randn(20, 3), 3)
            h = erasus.ops.herding(torch.randn(20, 3), 3)
            m = erasus.ops.kmeans_coreset(torch.randn(20, 3), 3)
        print(len(r.indices), len(h), len(m), len(caught), erasus.ops.backends()["cpp"]["available"])
        print(*[str(w.message) for w in caught], sep="\\n")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == "3 3 3 2 False", out
    assert "cpp backend is unavailable" in lines[1] and "faiss backend is unavailable" in lines[2]
