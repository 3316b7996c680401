import json
import subprocess
import sys

from erasus.cli import main


def test_unlearn_from_a_yaml_config(tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"scenario: random\nstrategy: npo\nstrategy_params: {{lr: 0.001}}\nselector: kcenter\n"
                      f"prune_ratio: 0.2\nepochs: 2\nout_dir: {out}\n")
    assert main(["unlearn", "--config", str(config)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["coreset_size"] == round(0.2 * report["forget_size"] + 0.4999)
    assert "| unlearned |" in capsys.readouterr().out


def test_an_adaptive_run_from_a_config_reports_its_rounds_and_verdict(tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"scenario: class\nstrategy: npo\nstrategy_params: {{lr: 0.001}}\nselector: kcenter\n"
                      f"prune_ratio: 0.1\nepochs: 2\nadaptive: true\nmax_rounds: 2\nout_dir: {out}\n")
    assert main(["unlearn", "--config", str(config)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert 1 <= len(report["adaptive"]["rounds"]) <= 2 and report["verdict"]["target"] is not None
    printed = capsys.readouterr().out
    assert "Verified adaptive coreset:" in printed and "**Verdict:**" in printed


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("strategy: npo\nlearning_rate: 1\n")
    assert main(["unlearn", "--config", str(config)]) == 2
    assert "config key 'learning_rate' is unknown (known: adaptive, adaptive_chunk, batch_size, epochs," in \
        capsys.readouterr().err


def test_demo_runs_as_a_module_and_prints_the_table(tmp_path):
    # from outside the source checkout, so that the installed package (with its extension) is the one run
    done = subprocess.run([sys.executable, "-m", "erasus", "demo"], capture_output=True, text=True, check=True,
                          timeout=300, cwd=tmp_path)
    out = done.stdout
    assert "unavailable" not in done.stderr
    assert "retrained (gold)" in out and "NPO, k-center coreset 20%" in out
    assert out.count("class    ") >= 7 and out.count("random   ") >= 7
