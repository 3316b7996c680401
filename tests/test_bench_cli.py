"""The bench/ scripts write bench/RESULTS.md or a committed plot only when asked (``--record``).

The scripts are imported by path (their ``main`` is not run, so no benchmark runs): their argument parsers must
default to not recording, and every write they make must go through bench/harness.py's gate.
"""
import ast
import importlib.util
import sys
import tempfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "harness.py")
# Calls that write a file; a script must leave them to harness.record_results / harness.plot_path.
WRITERS = {"append_results", "savefig", "write_text", "write_bytes", "to_csv", "save", "save_file", "dump"}
PLOTTERS = {"pareto_plot"}  # erasus.report functions a script hands a path to


@pytest.fixture(scope="module")
def scripts():
    """Each script's module, imported by path under a name that shadows nothing (bench/selectors.py would
    shadow the standard library's ``selectors``); sys.path and sys.modules are put back afterwards."""
    path_before, modules_before = list(sys.path), set(sys.modules)
    loaded = {}
    try:
        for script in SCRIPTS:
            spec = importlib.util.spec_from_file_location(f"bench_script_{script.stem}", script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            loaded[script.name] = module
        yield loaded
    finally:
        sys.path[:] = path_before
        for name in set(sys.modules) - modules_before:
            if name == "harness" or name.startswith("bench_script_"):
                del sys.modules[name]


def test_every_known_bench_script_is_checked():
    assert {"selectors.py", "grad_norms.py", "coreset_efficacy.py", "lm.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_default_run_does_not_record(scripts, script):
    parser = scripts[script].build_parser()
    assert parser.parse_args([]).record is False
    assert parser.parse_args(["--record"]).record is True
    assert parser.parse_args(["--no-record"]).record is False  # the old flag still parses, meaning the default
    assert "--record" in parser.format_help()


def test_record_gate_writes_only_when_asked(scripts, tmp_path, capsys):
    harness = scripts["selectors.py"].harness
    parser = scripts["selectors.py"].build_parser()
    results = tmp_path / "RESULTS.md"

    default = parser.parse_args([])
    assert harness.record_results(default, "title", "| a |", path=results) is False
    assert not results.exists()
    plot = harness.plot_path(default, "plot.png")
    try:
        assert plot.parent != BENCH and plot.parent.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    finally:
        plot.parent.rmdir()  # the fresh temporary folder plot_path made

    recorded = parser.parse_args(["--record"])
    assert harness.record_results(recorded, "title", "| a |", path=results) is True
    assert "| a |" in results.read_text()
    assert str(results) in capsys.readouterr().out
    assert harness.plot_path(recorded, "plot.png") == BENCH / "plot.png"


def _called_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _is_plot_path_call(node) -> bool:
    return isinstance(node, ast.Call) and _called_name(node) == "plot_path"


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_scripts_write_only_through_the_harness_gate(script):
    tree = ast.parse((BENCH / script).read_text())
    from_plot_path = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                      and _is_plot_path_call(node.value) for target in node.targets if isinstance(target, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "RESULTS":
            pytest.fail(f"{script}:{node.lineno} uses harness.RESULTS directly; use harness.record_results")
        if not isinstance(node, ast.Call):
            continue
        name = _called_name(node)
        assert name not in WRITERS, f"{script}:{node.lineno} calls {name}(); writes go through harness"
        if name == "open" and len(node.args) > 1:
            mode = node.args[1]
            assert isinstance(mode, ast.Constant) and set(str(mode.value)) <= set("rbt"), \
                f"{script}:{node.lineno} opens a file for writing"
        if name in PLOTTERS:
            path = node.args[1] if len(node.args) > 1 else next(k.value for k in node.keywords if k.arg == "path")
            assert _is_plot_path_call(path) or (isinstance(path, ast.Name) and path.id in from_plot_path), \
                f"{script}:{node.lineno}: a plot's path must come from harness.plot_path"
