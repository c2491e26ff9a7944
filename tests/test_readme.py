"""The README's opening example runs as written."""

import pathlib
import re

import mlo

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_trains_both_levels(capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    program = namespace["program"]
    assert isinstance(program, mlo.Program)
    assert program.steps == {"classifier": 100, "weighting": 100}
    assert "weighting: weighting -> classifier -> weighting" in capsys.readouterr().out
    mlo.registry.clear()
