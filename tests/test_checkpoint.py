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


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    program = build()
    program.step()
    path = tmp_path / "ckpt.pt"
    program.save(path)
    before = path.read_bytes()

    def interrupted(state, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    program.step()
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(OSError, match="No space left"):
        program.save(path)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]
    monkeypatch.undo()
    assert mlo.Program.load(path, *build().levels.values()).global_step == 1


def test_truncated_checkpoint_is_reported_as_such(tmp_path):
    path = tmp_path / "ckpt.pt"
    build().save(path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(mlo.CheckpointError, match=r"ckpt.pt is truncated or corrupted .*not written "
                                                  r"completely"):
        mlo.Program.load(path, *build().levels.values())


def test_corrupted_checkpoint_fails_its_checksum(tmp_path):
    path = tmp_path / "ckpt.pt"
    build().save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(mlo.CheckpointError, match=r"ckpt.pt is corrupted: record '.*' fails its "
                                                  r"checksum"):
        mlo.Program.load(path, *build().levels.values())


def test_a_file_that_is_no_checkpoint_is_not_called_corrupted(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(mlo.CheckpointError, match=r"notes.pt is not an mlo checkpoint \(not a "
                                                  r"torch zip file\)"):
        mlo.Program.load(path, *build().levels.values())
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(mlo.CheckpointError, match=r"load_state_dict: not an mlo checkpoint \(no "
                                                  r"'format' key\)"):
        mlo.Program.load(path, *build().levels.values())


def test_missing_checkpoint_and_other_format_are_clear_errors(tmp_path):
    with pytest.raises(mlo.CheckpointError, match=r"Program.load: no checkpoint at .*absent.pt"):
        mlo.Program.load(tmp_path / "absent.pt", *build().levels.values())
    state = build().state_dict()
    state["format"] = 1
    with pytest.raises(mlo.CheckpointError, match=r"checkpoint has format 1, this version of mlo "
                                                  r"reads format 2"):
        build().load_state_dict(state)
