"""Data parallelism on 2 forked CPU processes (gloo): equal to one process with the concatenated
batches; faults stop every rank promptly; checkpoints resume per rank."""

import datetime
import os
import pathlib
import re
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlo
from mlo.data import Stream

STEPS, BATCH = 4, 6
pytestmark = pytest.mark.skipif(not dist.is_available() or not hasattr(os, "fork"),
                                reason="needs gloo and fork")


def batches(seed, size):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS, size, 5, generator=g, dtype=torch.float64)
    return [(x[i], x[i] @ torch.linspace(0.1, 0.5, 5, dtype=torch.float64)[:, None]) for i in range(STEPS)]


def run_program(method, train, val, unroll=1):
    """Bilevel per-feature weight decay: the inner level fits, the outer learns the decay."""
    torch.manual_seed(0)
    net = nn.Linear(5, 1).double()
    decay = nn.Parameter(torch.zeros(5, dtype=torch.float64))

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.5),
               data=train, name="inner", unroll=unroll)
    def inner(batch, module, outer):
        x, y = batch
        return ((module(x) - y) ** 2).mean() + (outer().exp() * module.params["weight"][0] ** 2).sum()

    @mlo.level(module=decay, optimizer=torch.optim.SGD([decay], lr=0.2), data=val, hypergrad=method,
               name="outer")
    def outer(batch, inner):
        x, y = batch
        return ((inner(x) - y) ** 2).mean()

    program = mlo.Program(inner, outer)
    for _ in range(STEPS * unroll):
        program.step()
    return torch.cat([net.weight.detach().ravel(), net.bias.detach(), decay.detach()])


def shard(full, rank):
    return [(x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]) for x, y in full]


def equal_updates(rank, methods):
    results = {}
    for method in methods:
        train, val = batches(1, 2 * BATCH), batches(2, 2 * BATCH)
        name, unroll = UNROLLED.get(method, (method, 1))
        results[method] = run_program(name, shard(train, rank), shard(val, rank), unroll)
    loader = DataLoader(TensorDataset(torch.arange(12)), batch_size=2, shuffle=True)
    stream = Stream(loader, "level")
    results["samples"] = torch.cat([stream.next(0)[0] for _ in range(6)])  # 2 epochs of 3 batches
    return results


# itd over 2 steps: each rank replays its window with the ranks' mean gradient, as its real
# steps took, so the unroll is the global batch's
UNROLLED = {"itd2": ("itd", 2)}


def test_two_ranks_equal_one_process_with_concatenated_batches(tmp_path):
    methods = ["aid_fd", "aid_cg", "aid_neumann", "sama", "itd2"]
    results = forked(equal_updates, tmp_path, methods)
    for method in methods:
        name, unroll = UNROLLED.get(method, (method, 1))
        single = run_program(name, batches(1, 2 * BATCH), batches(2, 2 * BATCH), unroll)
        ranks = [result[method] for result in results]
        assert torch.equal(ranks[0], ranks[1]), method  # every rank applied identical updates
        assert torch.allclose(ranks[0], single, atol=1e-6, rtol=0), method
        assert not torch.allclose(single[-5:], torch.zeros(5, dtype=torch.float64))

    samples = [result["samples"] for result in results]
    for epoch in range(2):  # each epoch, the ranks see disjoint halves of the dataset
        halves = [s[epoch * 6:(epoch + 1) * 6] for s in samples]
        assert sorted(torch.cat(halves).tolist()) == list(range(12))
    assert not torch.equal(samples[0][:6], samples[0][6:])  # reshuffled by set_epoch


# -- faults: every rank fails, promptly, naming the rank, the level and the step ------------------

def forked(body, tmp_path, *args, timeout=20.0, group_timeout=10.0):
    """Run `body(rank, *args)` on 2 forked gloo ranks; return what each returned (or raised).

    Each call rendezvous through a file of its own: a second group started on the file of a first
    one reads the first group's stale addresses and fails to connect ("Connection refused")."""
    tmp_path = pathlib.Path(tempfile.mkdtemp(dir=tmp_path))
    context = mp.get_context("fork")
    processes = [context.Process(target=_rank_main, args=(
        rank, body, str(tmp_path / "init"), str(tmp_path / f"out-{rank}.pt"), group_timeout, args))
        for rank in range(2)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.1, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert all(p.exitcode == 0 for p in processes), "a rank did not finish in time"
    return [torch.load(tmp_path / f"out-{rank}.pt", weights_only=True) for rank in range(2)]


def _rank_main(rank, body, init_file, out, group_timeout, args):
    torch.set_num_threads(1)  # forked: the parent's thread pool does not exist here
    mlo.registry.clear()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=group_timeout))
    start = time.monotonic()
    try:
        result = body(rank, *args)
    except mlo.MloError as error:
        result = {"error": type(error).__name__, "message": str(error)}
    result["seconds"] = time.monotonic() - start
    torch.save(result, out)
    if dist.is_initialized():
        dist.destroy_process_group()


def faulty(rank, fault, method="aid_cg", on_nonfinite="raise"):
    """The bilevel program of `run_program` on this rank's shard; `fault(rank, step, batch)` may
    raise, sleep or return a damaged batch."""
    train = shard(batches(1, 2 * BATCH), rank)
    val = shard(batches(2, 2 * BATCH), rank)
    calls = {"inner": 0, "outer": 0}
    torch.manual_seed(0)
    net, decay = nn.Linear(5, 1).double(), nn.Parameter(torch.zeros(5, dtype=torch.float64))

    def damaged(level, batch):
        calls[level] += 1
        return fault(rank, level, calls[level], batch)

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.02), data=train)
    def inner(batch, module, outer):
        x, y = damaged("inner", batch)
        weight = module.params["weight"][0]
        return ((module(x) - y) ** 2).mean() + (outer().exp() * weight ** 2).sum()

    @mlo.level(module=decay, optimizer=torch.optim.SGD([decay], lr=0.2), data=val,
               hypergrad=method)
    def outer(batch, inner):
        x, y = damaged("outer", batch)
        return ((inner(x) - y) ** 2).mean()

    program = mlo.Program(inner, outer, on_nonfinite=on_nonfinite)
    for _ in range(STEPS):
        program.step()
    return {"params": torch.cat([net.weight.detach().ravel(), net.bias.detach(), decay.detach()]),
            "skipped": dict(program.skipped)}


def raises_on_rank_1(rank, level, call, batch):
    if rank == 1 and level == "inner" and call == 4:  # 2: the one-time handle check
        raise ValueError("the loader returned a corrupt sample")
    return batch


def hangs_on_rank_1(rank, level, call, batch):
    if rank == 1 and level == "outer" and call == 2:
        time.sleep(3)
    return batch


def nan_on_rank_1(rank, level, call, batch):
    x, y = batch
    if rank == 1 and (level, call) in {("inner", 4), ("outer", 2)}:  # both real costs of step 1
        return x, torch.full_like(y, float("nan"))
    return batch


def test_a_rank_that_raises_stops_every_rank_at_once_naming_it(tmp_path):
    results = forked(faulty, tmp_path, raises_on_rank_1)
    failed = r"Program.step \(step 1\): level 'inner' failed on rank 1 of 2 \(ValueError: the " \
             r"loader returned a corrupt sample\)"
    assert results[1]["error"] == results[0]["error"] == "DistributedError"
    assert re.fullmatch(failed + r"; every rank stops. The original error is chained above.",
                        results[1]["message"])
    assert re.fullmatch(failed + r", so rank 0 stops too; see that rank's error for the cause.",
                        results[0]["message"])
    assert results[0]["seconds"] < 5  # at once, not after the process group's 10 s timeout


def test_a_rank_that_hangs_fails_the_others_after_the_timeout(tmp_path):
    results = forked(faulty, tmp_path, hangs_on_rank_1, group_timeout=1.0)
    assert results[0]["error"] == "DistributedError"
    assert re.match(r"Program.step \(step 1\): level 'outer': rank 0 of 2 lost the other ranks "
                    r"in a collective \(.*\): a rank died, or waited longer than the process "
                    r"group's timeout", results[0]["message"])
    assert 0.9 < results[0]["seconds"] < 2.9  # the timeout, before the sleeper wakes at 3 s


def test_nonfinite_loss_on_one_rank_is_skipped_on_every_rank(tmp_path):
    results = forked(faulty, tmp_path, nan_on_rank_1, "aid_cg", "skip")
    assert results[0]["skipped"] == results[1]["skipped"] == {"inner": 1, "outer": 1}
    assert torch.equal(results[0]["params"], results[1]["params"])
    assert torch.isfinite(results[0]["params"]).all()


def checkpointed(rank, folder):
    """An uninterrupted 8-step run, then 4 steps with checkpoints and a resume to 8 from them."""
    def program():
        mlo.registry.clear()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.3), nn.Linear(4, 1))
        decay = nn.Parameter(torch.zeros(5))
        data = TensorDataset(torch.randn(24, 5), torch.randn(24, 1))

        @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
                   data=DataLoader(data, batch_size=4, shuffle=True), unroll=2)
        def inner(batch, module, outer):
            x, y = batch
            return ((module(x) - y) ** 2).mean() + (outer().exp() * module.params["0.weight"]
                                                    ** 2).sum(1).mean() * 1e-2

        @mlo.level(module=decay, optimizer=torch.optim.Adam([decay], lr=0.1),
                   data=DataLoader(data, batch_size=6, shuffle=True), hypergrad="itd")
        def outer(batch, inner):
            x, y = batch
            return ((inner(x) - y) ** 2).mean()

        return mlo.Program(inner, outer), net, decay

    def params(net, decay):
        return torch.cat([p.detach().ravel() for p in net.parameters()] + [decay.detach()])

    return interrupted(program, params, folder)[0]


def interrupted(program, params, folder):
    """`program()` (a Program and what `params` reads) run 8 steps without a break, and 5 steps
    with checkpoints in `folder` every 2 then resumed to 8 from them; returns what to compare
    ({"expected", "resumed", "step"}) and the resumed Program."""
    reference, *parts = program()
    reference.run(8, progress=False)
    expected = params(*parts)
    first, *_ = program()
    first.run(5, checkpoint=folder, checkpoint_every=2, progress=False)
    resumed, *parts = program()
    resumed.run(8, checkpoint=folder, checkpoint_every=2, resume=True, progress=False)
    return {"expected": expected, "resumed": params(*parts), "step": resumed.global_step}, resumed


def test_checkpoint_of_two_ranks_resumes_on_two_ranks_bit_for_bit(tmp_path, parts):
    folder = tmp_path / "run"
    results = forked(checkpointed, tmp_path, str(folder))
    for result in results:
        assert result["step"] == 8 and torch.equal(result["resumed"], result["expected"])
    assert {p.name for p in folder.iterdir()} >= {"step-000000008.rank0.pt",
                                                  "step-000000008.rank1.pt"}

    @mlo.level(**parts())  # any program: the world size is checked first
    def alone(module):
        return module(torch.ones(2)).sum()

    with pytest.raises(mlo.CheckpointError, match=r"holds checkpoints of a run with 2 rank\(s\), "
                                                  r"this run has 1; .* resume with the same "
                                                  r"number of ranks"):
        mlo.Program(alone).run(8, checkpoint=folder, resume=True, progress=False)
    state = torch.load(folder / "step-000000008.rank0.pt", weights_only=True)
    with pytest.raises(mlo.CheckpointError, match=r"saved by 2 rank\(s\), this run has 1"):
        mlo.Program(alone).load_state_dict(state)


# -- the direct gradient is reduced in buckets during the backward pass --------------------------

def accumulated(rank, flat):
    """An MLP inner level (a bucket per parameter, grad_accum=2, clip_grad) under aid_cg; `flat`
    averages after the step instead. Returns the parameters and, for a backward pass reaching
    the last layer only, how many buckets were sent before it returned."""
    mlo.distributed.BUCKET_MB = 1e-7  # under a byte: every parameter fills a bucket of its own
    train, val = batches(1, 2 * BATCH), batches(2, 2 * BATCH)
    return accumulating_program(shard(train, rank), shard(val, rank), flat)


def accumulating_program(train, val, flat=False):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    decay = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    micro = [(x[i::2], y[i::2]) for x, y in train for i in range(2)]

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5),
               data=micro, grad_accum=2, clip_grad=0.5, name="inner")
    def inner(batch, module, outer):
        x, y = batch
        return ((module(x) - y) ** 2).mean() + (outer().exp() * module[0].weight ** 2).sum(0).mean()

    @mlo.level(module=decay, optimizer=torch.optim.SGD([decay], lr=0.2), data=val,
               hypergrad="aid_cg", name="outer")
    def outer(batch, inner):
        x, y = batch
        return ((inner(x) - y) ** 2).mean()

    program = mlo.Program(inner, outer)
    sent = None
    if flat:
        program._reducers.clear()
    elif program._parallel:
        reducer = program._reducers["inner"]
        reducer.arm()
        loss = net[2](torch.ones(1, 4, dtype=torch.float64)).sum()
        grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
        sent = (len(reducer._works), len(reducer._buckets))
        reduced = reducer.reduced(grads)  # the first layer's buckets are completed with zeros
        sent += (float(reduced[0].abs().sum()), float(reduced[2].sum()))
    for _ in range(STEPS):
        program.step()
    params = torch.cat([p.detach().ravel() for p in net.parameters()] + [decay.detach()])
    return {"params": params, "sent": sent}


def test_bucketed_reduction_during_backward_equals_flat_and_one_process(tmp_path):
    bucketed = forked(accumulated, tmp_path, False)
    flat = forked(accumulated, tmp_path, True)
    single = accumulating_program(batches(1, 2 * BATCH), batches(2, 2 * BATCH))["params"]
    assert bucketed[0]["sent"] == (2, 4, 0.0, 4.0)  # sent while autograd ran; then the rest
    assert torch.equal(bucketed[0]["params"], bucketed[1]["params"])
    assert torch.allclose(bucketed[0]["params"], flat[0]["params"], atol=1e-12, rtol=0)
    assert torch.allclose(bucketed[0]["params"], single, atol=1e-6, rtol=0)
    assert not torch.allclose(single[-5:], torch.zeros(5, dtype=torch.float64))


def fp16_overflow(rank):
    """An fp16 inner level whose gradient overflows on rank 1 only, in its last step."""
    torch.manual_seed(0)
    net, decay = nn.Linear(5, 1), nn.Parameter(torch.zeros(5))
    train = [(x.float() * (300.0 if rank == 1 and i == 3 else 1.0), y.float())
             for i, (x, y) in enumerate(shard(batches(1, 2 * BATCH), rank))]
    val = [(x.float(), y.float()) for x, y in shard(batches(2, 2 * BATCH), rank)]

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.02), data=train,
               fp16=True)
    def inner(batch, module, outer):
        x, y = batch
        return ((module(x) - y) ** 2).mean() + (outer().exp() * module.weight[0] ** 2).sum()

    @mlo.level(module=decay, optimizer=torch.optim.SGD([decay], lr=0.2), data=val,
               hypergrad="aid_fd")
    def outer(batch, inner):
        x, y = batch
        return ((inner(x) - y) ** 2).mean()

    with pytest.warns(UserWarning):  # fp16 on CPU
        program = mlo.Program(inner, outer)
    for _ in range(STEPS):
        program.step()
    return {"params": torch.cat([net.weight.detach().ravel(), net.bias.detach(), decay.detach()]),
            "overflows": program._precision["inner"].overflows}


def test_an_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    results = forked(fp16_overflow, tmp_path)
    alone = fp16_overflow(0)["overflows"]  # rank 0's shard in one process: no overflow at step 3
    assert results[0]["overflows"] == results[1]["overflows"] == alone + 1
    assert torch.equal(results[0]["params"], results[1]["params"])
    assert torch.isfinite(results[0]["params"]).all()
