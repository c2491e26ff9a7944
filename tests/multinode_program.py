"""Run by test_multinode.py under torchrun, once per "node": the bilevel program of
test_distributed on this rank's shard of the batches; saves its final parameters to
OUT.rank<r>.pt.

    python -m torch.distributed.run --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d \\
        --rdzv-endpoint=127.0.0.1:PORT multinode_program.py OUT
"""

import datetime
import sys

import torch
import torch.distributed as dist

from test_distributed import BATCH, batches, run_program, shard

if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    rank = dist.get_rank()
    params = run_program("aid_cg", shard(batches(1, 2 * BATCH), rank),
                         shard(batches(2, 2 * BATCH), rank))
    torch.save({"params": params, "world_size": dist.get_world_size()}, f"{sys.argv[1]}.rank{rank}.pt")
    dist.destroy_process_group()
