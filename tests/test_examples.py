"""Smoke-test the examples: each one's --quick mode runs to the end and prints its results table.

Each example runs as a subprocess, as a user runs it from the README (seconds each; the whole file
stays well under a minute on a 2-core CPU). Add an example by adding its file name to EXAMPLES.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ["hpo_logreg.py", "data_reweighting.py", "label_correction.py", "domain_adaptation.py",
            "darts.py", "maml_sinusoid.py", "few_shot.py"]
TABLE_RULE = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$", re.MULTILINE)  # a markdown |---|---| line


RUNS = [[n] for n in EXAMPLES] + [["maml_sinusoid.py", "--vmap"]]  # and variants


@pytest.mark.parametrize("run", [r for r in RUNS if (ROOT / "examples" / r[0]).is_file()],
                         ids=" ".join)
def test_example_quick_mode_prints_its_results_table(run, tmp_path):
    name, *options = run
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--quick", *options],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    output = f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == 0, f"{name} --quick exited with {result.returncode}:\n{output}"
    assert TABLE_RULE.search(result.stdout), f"{name} --quick printed no markdown table:\n{output}"
