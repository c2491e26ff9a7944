"""Two "nodes" on loopback through torchrun (c10d rendezvous): the same code path as one machine,
identical updates on both, equal to one process with the concatenated batches."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from test_distributed import BATCH, batches, run_program

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_through_torchrun_finish_with_identical_parameters(tmp_path):
    out = tmp_path / "params"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
               "--rdzv-id=mlo-multinode", "--rdzv-conf=join_timeout=30", "--max-restarts=0",
               "--monitor-interval=0.1", str(Path(__file__).parent / "multinode_program.py"),
               str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent),
                                           os.environ.get("PYTHONPATH", "")]))
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=60)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(logs)[-3000:]
    results = [torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world_size"] for r in results] == [2, 2]
    assert torch.equal(results[0]["params"], results[1]["params"])
    single = run_program("aid_cg", batches(1, 2 * BATCH), batches(2, 2 * BATCH))
    assert torch.allclose(results[0]["params"], single, atol=1e-6, rtol=0)
