"""Periodic checkpoints and resume: a run killed (SIGKILL) at random moments, also in the middle
of its saves, and resumed each time from its newest checkpoint ends bit for bit as a run that
was never interrupted; no checkpoint it leaves is ever unreadable."""

import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import mlo
from mlo import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from resume_program import build, parameters  # noqa: E402

STEPS, EVERY = 100, 2
pytestmark = pytest.mark.skipif(sys.platform == "win32" or not hasattr(os, "fork"),
                                reason="kills forked processes")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_inside_save(phase: str, nth: int) -> None:
    """Make the `nth` checkpoint save of this process die at `phase` of the atomic write."""
    saves = {"count": 0}
    real_save, real_replace = torch.save, os.replace
    real_fsync_folder, real_unlink = checkpoint._fsync_folder, Path.unlink

    def counted(real, at):
        def wrapper(*args, **kwargs):
            if at == "save":
                saves["count"] += 1
            if phase == at and saves["count"] == nth:
                if at == "save":  # half the bytes reach the temporary file, then the kill
                    args[1].write(b"PK\x03\x04" + b"\0" * 500)
                    args[1].flush()
                die()
            return real(*args, **kwargs)
        return wrapper

    torch.save = counted(real_save, "save")
    os.replace = counted(real_replace, "replace")
    checkpoint._fsync_folder = counted(real_fsync_folder, "fsync_folder")
    Path.unlink = counted(real_unlink, "unlink")


def child(folder, out, kill):
    torch.set_num_threads(1)  # forked: the parent's thread pool does not exist here
    mlo.registry.clear()
    if kill is not None:
        die_inside_save(*kill)
    program = build()
    if folder is None:
        program.run(STEPS, progress=False)
    else:
        program.run(STEPS, checkpoint=folder, checkpoint_every=EVERY, keep=2, resume=True,
                    progress=False)
    torch.save({"parameters": parameters(program), "history": program.history.state_dict(),
                "step": program.global_step}, out)


def launch(folder, out, kill=None):
    process = multiprocessing.get_context("fork").Process(target=child, args=(folder, out, kill))
    process.start()
    return process


def finish(process, timeout=30.0):
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail("a run did not finish within its timeout")
    return process.exitcode


def newest(folder) -> int:
    steps = [int(name[5:-3]) for name in os.listdir(folder)
             if name.startswith("step-") and name.endswith(".pt")] if folder.exists() else []
    return max(steps, default=-1)


def kill_later(process, folder, target: int, delay: float, timeout=20.0) -> None:
    """SIGKILL `process` `delay` seconds after its checkpoint of step `target` appears."""
    deadline = time.monotonic() + timeout
    while process.is_alive() and newest(folder) < target and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(delay)
    process.kill()


def test_runs_killed_twenty_times_resume_bit_for_bit(tmp_path):
    rng = random.Random(11)
    started = time.perf_counter()
    reference = launch(None, tmp_path / "reference.pt")
    assert finish(reference) == 0
    interval = (time.perf_counter() - started) / STEPS * EVERY  # about one checkpoint's steps

    folder, killed, torn = tmp_path / "run", 0, 0
    phases = ["save", "replace", "fsync_folder", "unlink"]
    for trial in range(20):
        if trial % 2:  # killed by the parent at a random moment within the next checkpoints
            process = launch(folder, tmp_path / "out.pt")
            kill_later(process, folder, newest(folder) + EVERY * rng.randint(0, 1),
                       rng.uniform(0, 1.5) * interval)
        else:  # killed by itself inside the atomic save, at each of its phases in turn
            process = launch(folder, tmp_path / "out.pt", (phases[trial // 2 % 4],
                                                           rng.randint(1, 2)))
        killed += finish(process) == -signal.SIGKILL
        torn += any(file.name.endswith(".tmp") for file in folder.iterdir())  # killed mid-save
        for file in folder.iterdir():
            if not file.name.startswith("."):  # temporary files are not checkpoints
                assert checkpoint.load(file)["format"] == checkpoint.FORMAT, file
    assert killed == 20 and torn >= 4 and newest(folder) < STEPS
    assert finish(launch(folder, tmp_path / "out.pt")) == 0

    expected = torch.load(tmp_path / "reference.pt", weights_only=True)
    resumed = torch.load(tmp_path / "out.pt", weights_only=True)
    assert resumed["step"] == expected["step"] == STEPS
    for key, value in expected["parameters"].items():
        assert torch.equal(resumed["parameters"][key], value), key
    assert mlo.history.History.from_state(resumed["history"]) == \
        mlo.history.History.from_state(expected["history"])
