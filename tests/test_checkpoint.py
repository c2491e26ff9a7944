"""Checkpoints: bit-exact resume in a new process, and refusal of pickled code."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mlo

sys.path.insert(0, str(Path(__file__).parent))
from resume_program import build, parameters  # noqa: E402


def test_resume_in_new_process_is_bit_exact(tmp_path):
    reference = build()
    for _ in range(60):
        reference.step()
    expected = parameters(reference)

    program = build()
    for _ in range(37):
        program.step()
    assert program.steps["decay"] * 3 < program.steps["regressor"]  # cut inside an unroll window
    program.save(tmp_path / "ckpt.pt")
    out = tmp_path / "params.pt"
    script = Path(__file__).parent / "resume_program.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt.pt"), "23", str(out)],
                   check=True, env=env, timeout=120)
    resumed = torch.load(out, weights_only=True)
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_state_dict_round_trip_restores_counters_and_history():
    program = build()
    for _ in range(5):
        program.step()
    state = program.state_dict()
    fresh = build()
    fresh.load_state_dict(state)
    assert fresh.global_step == 5 and fresh.steps == program.steps
    assert fresh.history == program.history


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "levels": Payload()}, path)
    with pytest.raises(mlo.CheckpointError, match=r"Program.load: refused to load .*evil.pt"):
        mlo.Program.load(path, *build().levels.values())
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_checkpoint_of_other_levels_is_refused():
    state = build().state_dict()
    state["levels"]["other"] = state["levels"].pop("decay")
    with pytest.raises(mlo.CheckpointError, match=r"checkpoint has levels 'other', 'regressor'"):
        build().load_state_dict(state)
