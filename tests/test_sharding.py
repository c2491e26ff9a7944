"""Sharded levels (FSDP2) on 2 forked CPU processes (gloo): parameters, gradients and optimizer
state are shards, and every method's program equals one process with the concatenated batches;
checkpoints of a sharded program resume exactly; wrong uses fail early."""

import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlo
from test_distributed import forked, interrupted

STEPS, BATCH = 4, 6
# CG past convergence (10 iterations on these 29 parameters) amplifies rounding to 1e-6; aid_fd's
# forward-over-reverse product and its central difference run on shards too
HYPERGRADS = {"itd": "itd", "aid_cg": mlo.hypergrad.aid_cg(iters=3), "aid_neumann": "aid_neumann",
              "aid_fd": "aid_fd", "sama": "sama",
              "aid_fd_forward": mlo.hypergrad.aid_fd(mode="forward"),
              "aid_fd_central": mlo.hypergrad.aid_fd(exact=False)}
METHODS = tuple(HYPERGRADS)
pytestmark = pytest.mark.skipif(not dist.is_available() or not hasattr(os, "fork"),
                                reason="needs gloo and fork")


def batches(seed, size):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS, size, 5, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.linspace(-0.5, 0.5, 5, dtype=torch.float64)[:, None])
    return [(x[i], y[i]) for i in range(STEPS)]


def shard(full, rank):
    return [(x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]) for x, y in full]


def run_program(method, train, val, sharded=True, unroll=1, adam=False, norm=False,
                device="cpu", clip=None, tasks=1):
    """An MLP inner level (sharded) fits inputs rescaled by the outer level, which learns the
    per-feature scales from validation data (averaging `tasks` windows per step)."""
    mlo.registry.clear()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4) if norm else nn.Identity(), nn.Tanh(),
                        nn.Linear(4, 1)).double().to(device)
    scales = nn.Parameter(torch.zeros(5, dtype=torch.float64, device=device))
    train, val = ([(x.to(device), y.to(device)) for x, y in data] for data in (train, val))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05) if method == "sama" or adam \
        else torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)

    # aid_cg accumulates 2 micro-batches per step, aid_neumann clips the (sharded) gradient
    @mlo.level(module=net, optimizer=optimizer, data=train, shard=sharded, name="inner",
               unroll=unroll, grad_accum=2 if method == "aid_cg" else 1,
               clip_grad=0.05 if method == "aid_neumann" else clip)
    def inner(batch, module, outer):
        x, y = batch
        return ((module(x * outer().exp()) - y) ** 2).mean()

    @mlo.level(module=scales, optimizer=torch.optim.SGD([scales], lr=0.5), data=val,
               hypergrad=HYPERGRADS.get(method, method), name="outer", tasks=tasks)
    def outer(batch, inner):
        x, y = batch
        return ((inner(x) - y) ** 2).mean()

    program = mlo.Program(inner, outer)
    for _ in range(STEPS * unroll):
        program.step()
    kinds = {type(p).__name__ for p in net.parameters()}
    kinds |= {type(s).__name__ for state in optimizer.state.values() for s in state.values()
              if s.dim() > 0}
    with torch.no_grad():  # the sharded net through its own hooks, on fresh inputs
        outputs = net(torch.ones(3, 5, dtype=torch.float64, device=device)).ravel().cpu()
    params = torch.cat([_full(p).ravel() for p in net.parameters()] + [scales.detach()]).cpu()
    return {"params": params, "outputs": outputs, "kinds": sorted(kinds),
            "buffers": [b.detach().clone().cpu() for b in net.buffers()]}


def _full(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


def sharded_runs(rank):
    train, val = shard(batches(1, 2 * BATCH), rank), shard(batches(2, 2 * BATCH), rank)
    runs = {method: run_program(method, train, val) for method in METHODS}
    # unrolls of 2 Adam steps, replayed (and recomputed) on shards: the unroll of the global
    # batch, as in one process
    for name, method in (("itd2", "itd"), ("recompute2", mlo.hypergrad.itd(recompute=True))):
        runs[name] = run_program(method, train, val, unroll=2, adam=True)
        # unsharded data parallelism too: each rank replays with the ranks' mean gradient
        runs[name, "unsharded"] = run_program(method, train, val, False, unroll=2, adam=True)
    # a clipped update gathers the parameters whole (its rule takes the gradient's norm), as
    # unsharded data parallelism does
    for sharded in (True, False):
        runs["clipped", sharded] = run_program("itd", train, val, sharded, unroll=2, clip=0.05)
    for sharded in (True, False):  # running statistics: each rank its own, as without sharding
        runs["norm", sharded] = run_program("aid_fd", train, val, sharded, norm=True)
    # meta-batches of 2 windows: the inner level's real steps between the tasks leave the outer
    # level's accumulated gradient as it was
    for method in ("itd", "aid_cg"):
        runs["tasks", method] = run_program(method, train, val, tasks=2)
    return runs


def two_uppers(train, val, sharded=True):
    """An MLP inner level (sharded) steered by two itd upper levels: input scales and a target
    shift, each replaying the inner steps after the other may have stepped."""
    mlo.registry.clear()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    scales = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    shift = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=train,
               shard=sharded, name="inner", unroll=2)
    def inner(batch, module, scale, shifted):
        x, y = batch
        return ((module(x * scale().exp()) - y - shifted()) ** 2).mean()

    @mlo.level(module=scales, optimizer=torch.optim.SGD([scales], lr=0.5), data=val,
               hypergrad="itd", name="scale")
    def scale(batch, inner):
        x, y = batch
        return ((inner(x) - y) ** 2).mean()

    @mlo.level(module=shift, optimizer=torch.optim.SGD([shift], lr=0.5), data=val,
               hypergrad="itd", name="shifted")
    def shifted(batch, inner):
        x, y = batch
        return ((inner(x) - y - 0.1) ** 2).mean()

    program = mlo.Program(inner, scale, shifted)
    for _ in range(STEPS):
        program.step()
    return torch.cat([_full(p).ravel() for p in net.parameters()] + [scales.detach(),
                                                                      shift.detach()])


def two_uppers_runs(rank):
    train, val = shard(batches(1, 2 * BATCH), rank), shard(batches(2, 2 * BATCH), rank)
    return {sharded: two_uppers(train, val, sharded) for sharded in (True, False)}


def test_two_itd_uppers_of_a_sharded_level_equal_one_process(tmp_path):
    """Under data parallelism (sharded or not) each upper replays the inner steps with the other
    upper's values at those steps, as one process's recorded steps read them."""
    results = forked(two_uppers_runs, tmp_path, timeout=60.0)
    single = two_uppers(batches(1, 2 * BATCH), batches(2, 2 * BATCH))
    for sharded in (True, False):
        assert torch.equal(results[0][sharded], results[1][sharded]), sharded
        assert torch.allclose(results[0][sharded], single, atol=1e-10, rtol=0), sharded
    assert not torch.allclose(single[-6:], torch.zeros(6, dtype=torch.float64))


def cuda_rank(rank, folder):
    """One rank of `test_on_two_gpus_with_nccl`: every method, sharded, on cuda:rank."""
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    train, val = shard(batches(1, 2 * BATCH), rank), shard(batches(2, 2 * BATCH), rank)
    runs = {method: run_program(method, train, val, device=f"cuda:{rank}") for method in METHODS}
    torch.save(runs, f"{folder}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2
                    or not dist.is_nccl_available(), reason="needs 2 GPUs and nccl")
def test_on_two_gpus_with_nccl(tmp_path):
    """The CPU test below on 2 GPUs (nccl): every method equals one process (on CPU)."""
    context = mp.get_context("spawn")  # CUDA cannot be used in forked processes
    processes = [context.Process(target=cuda_rank, args=(rank, str(tmp_path))) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(300)
    assert all(p.exitcode == 0 for p in processes)
    results = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    for method in METHODS:
        single = run_program(method, batches(1, 2 * BATCH), batches(2, 2 * BATCH))
        assert results[0][method]["kinds"] == ["DTensor"], method
        assert torch.equal(results[0][method]["params"], results[1][method]["params"]), method
        assert torch.allclose(results[0][method]["params"], single["params"], atol=1e-8,
                              rtol=0), method


def test_a_sharded_level_equals_one_process_with_concatenated_batches_for_every_method(tmp_path):
    results = forked(sharded_runs, tmp_path, timeout=60.0)
    for method in METHODS:
        single = run_program(method, batches(1, 2 * BATCH), batches(2, 2 * BATCH))
        ranks = [result[method] for result in results]
        assert ranks[0]["kinds"] == ["DTensor"], method  # parameters and optimizer state: shards
        assert single["kinds"] == ["Parameter", "Tensor"]  # one process: shard=True does nothing
        assert torch.equal(ranks[0]["params"], ranks[1]["params"]), method
        assert torch.allclose(ranks[0]["params"], single["params"], atol=1e-10, rtol=0), method
        assert torch.allclose(ranks[0]["outputs"], single["outputs"], atol=1e-10, rtol=0), method
        assert not torch.allclose(single["params"][-5:], torch.zeros(5, dtype=torch.float64))
    for name, method in (("itd2", "itd"), ("recompute2", mlo.hypergrad.itd(recompute=True))):
        single = run_program(method, batches(1, 2 * BATCH), batches(2, 2 * BATCH), unroll=2,
                             adam=True)
        assert results[0][name]["kinds"] == ["DTensor"]
        assert torch.allclose(results[0][name]["params"], single["params"], atol=1e-10, rtol=0)
        assert torch.allclose(results[0][name, "unsharded"]["params"], single["params"],
                              atol=1e-10, rtol=0)
    for name in ("clipped", "norm"):
        sharded, unsharded = results[0][name, True], results[0][name, False]
        assert sharded["kinds"] == ["DTensor"] and unsharded["kinds"] == ["Parameter", "Tensor"]
        assert torch.allclose(sharded["params"], unsharded["params"], atol=1e-6, rtol=0), name
        for ours, theirs in zip(sharded["buffers"], unsharded["buffers"]):
            assert torch.allclose(ours.double(), theirs.double(), atol=1e-6, rtol=0), name
    for method in ("itd", "aid_cg"):
        single = run_program(method, batches(1, 2 * BATCH), batches(2, 2 * BATCH), tasks=2)
        ranks = [result["tasks", method] for result in results]
        assert torch.equal(ranks[0]["params"], ranks[1]["params"]), method
        assert torch.allclose(ranks[0]["params"], single["params"], atol=1e-10, rtol=0), method
    # advanced by the inner steps, the outer steps (the twin, on the module's own buffers) and
    # the evaluation of `outputs`; not by the hypergradient passes
    assert int(results[0]["norm", True]["buffers"][2]) == 2 * STEPS + 1


def given_values(rank):
    """A functional pass on a sharded level runs on the tensors it is given, not on the module's
    own (FSDP2's hooks would install those): zeros give a zero output, the gathered parameters
    (or this rank's shards of them, `mlo.shards.Shards`) the module's own output."""
    train, val = shard(batches(1, 2 * BATCH), rank), shard(batches(2, 2 * BATCH), rank)
    run_program("aid_fd", train, val)
    level = mlo.registry["inner"]
    x = torch.randn(3, 5, dtype=torch.float64)
    full = mlo.sharding.full({k: p.detach() for k, p in level.named_parameters().items()})
    local = mlo.sharding.leaves(level)
    zeros = mlo.shards.Shards({k: torch.zeros_like(t) for k, t in local.items()})
    with torch.no_grad():
        return {"zeros": mlo.handle.Handle(level, zeros)(x),
                "gathered": mlo.handle.Handle(level, full)(x), "live": level(x),
                "shards": mlo.handle.Handle(level, local)(x),
                "first": mlo.handle.Handle(level, full)[0](x), "first_live": level.module[0](x),
                "first_shards": mlo.handle.Handle(level, local)[0](x),
                "by_name": mlo.handle.Handle(level, local).params["0.weight"],
                "weight": full["0.weight"], "local_rows": local["0.weight"].shape[0]}


def test_a_functional_pass_on_a_sharded_level_uses_the_given_values(tmp_path):
    for result in forked(given_values, tmp_path):
        assert torch.equal(result["zeros"], torch.zeros(3, 1, dtype=torch.float64))
        for ours in ("gathered", "shards"):
            assert torch.allclose(result[ours], result["live"], atol=1e-12, rtol=0)
        for ours in ("first", "first_shards"):
            assert torch.allclose(result[ours], result["first_live"], atol=1e-12, rtol=0)
        assert not torch.equal(result["live"], torch.zeros(3, 1, dtype=torch.float64))
        assert result["local_rows"] == 2  # 4 rows of the first weight, 2 per rank
        assert torch.equal(result["by_name"], result["weight"])  # read by name: whole


def shard_derivatives(rank):
    """Gradients, Hessian-vector products and tangents taken on this rank's shards, and the same
    taken on the whole parameters, then averaged over ranks as data parallelism does; for a batch
    of rows and for a batch of sequences of rows (a Linear layer's leading dimensions)."""
    train, val = shard(batches(1, 2 * BATCH), rank), shard(batches(2, 2 * BATCH), rank)
    run_program("aid_fd", train, val)
    level = mlo.registry["inner"]
    x, y = train[0]
    local = mlo.sharding.leaves(level)
    whole = {k: t.detach().requires_grad_() for k, t in mlo.sharding.full(
        {k: p.detach() for k, p in level.named_parameters().items()}).items()}
    w = {k: torch.randn_like(t) for k, t in whole.items()}  # the same on both ranks (same seed)
    out = {"shards": {}, "whole": {}}
    for inputs, targets in ((x, y), (torch.stack([x, -x.flip(0)]), torch.stack([y, y]))):
        for name, params in (("shards", local), ("whole", whole)):
            loss = ((mlo.handle.Handle(level, params)(inputs) - targets) ** 2).mean()
            keys = list(params)
            grads = torch.autograd.grad(loss, [params[k] for k in keys], create_graph=True)
            part = {k: mlo.shards.part(level, {k: w[k]})[k] for k in keys} if name == "shards" \
                else w
            hvp = torch.autograd.grad(grads, [params[k] for k in keys], [part[k] for k in keys])
            grads, hvp = dict(zip(keys, grads)), dict(zip(keys, hvp))
            if name == "whole":  # the ranks' mean, then this rank's part
                grads = mlo.shards.part(level, mlo.distributed.average(
                    {k: g.detach() for k, g in grads.items()}))
                hvp = mlo.shards.part(level, mlo.distributed.average(hvp))
            found = out[name].setdefault(inputs.dim(), {})
            found["grad"] = torch.cat([g.detach().ravel() for g in grads.values()])
            found["hvp"] = torch.cat([h.ravel() for h in hvp.values()])
            with torch.autograd.forward_ad.dual_level():
                duals = {k: torch.autograd.forward_ad.make_dual(params[k].detach(), part[k])
                         for k in keys}
                y_dual = mlo.handle.Handle(level, type(params)(duals))(inputs)
                found["tangent"] = torch.autograd.forward_ad.unpack_dual(y_dual).tangent.clone()
    return out


def test_derivatives_on_shards_are_the_data_parallel_ones(tmp_path):
    for result in forked(shard_derivatives, tmp_path):
        assert sorted(result["shards"]) == [2, 3]
        for dims, found in result["shards"].items():
            for what in ("grad", "hvp", "tangent"):
                assert torch.allclose(found[what], result["whole"][dims][what], atol=1e-12,
                                      rtol=0), (dims, what)
            assert found["grad"].abs().max() > 0 and found["hvp"].abs().max() > 0


class Blocks(nn.Module):
    """Parameters of the module itself (`inp`, `out`), units (the ModuleList's blocks) and units
    inside units (each block's Linear layers); odd sizes leave some shards short or empty."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 3)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
                                    for _ in range(2))
        self.out = nn.Linear(3, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def blocks_program(train, val):
    """`Blocks` (sharded) learning from inputs rescaled by the outer level, by `aid_cg`."""
    mlo.registry.clear()
    torch.manual_seed(0)
    net = Blocks().double()
    scales = nn.Parameter(torch.zeros(5, dtype=torch.float64))

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), shard=True,
               data=train, name="inner")
    def inner(batch, module, outer):
        x, y = batch
        return ((module(x * outer().exp()) - y) ** 2).mean()

    @mlo.level(module=scales, optimizer=torch.optim.SGD([scales], lr=0.5), name="outer",
               data=val, hypergrad=mlo.hypergrad.aid_cg(iters=3))
    def outer(batch, inner):
        x, y = batch
        return ((inner(x) - y) ** 2).mean()

    program = mlo.Program(inner, outer)
    return program, lambda: torch.cat([_full(p).ravel() for p in net.parameters()]
                                      + [scales.detach()])


def nested_units(rank):
    """Calls on shards of the whole module, of a unit, of a unit inside a unit and of a module the
    root owns, against the same calls on the whole parameters; gradients to the shards against the
    ranks' mean of the whole gradients; then the program's steps."""
    program, params_now = blocks_program(shard(batches(1, 2 * BATCH), rank),
                                         shard(batches(2, 2 * BATCH), rank))
    level = program.levels["inner"]
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    h = torch.randn(4, 3, dtype=torch.float64)
    local = mlo.sharding.leaves(level)
    whole = {k: t.detach().requires_grad_() for k, t in mlo.sharding.full(
        {k: p.detach() for k, p in level.named_parameters().items()}).items()}
    out = {}
    for name, params in (("shards", local), ("whole", whole)):
        handle = mlo.handle.Handle(level, params)
        calls = [handle(x), handle.blocks[0](h), handle.blocks[1][2](h), handle.inp(x)]
        grads = torch.autograd.grad(sum(c.pow(2).sum() for c in calls), list(params.values()))
        grads = dict(zip(params, grads))
        if name == "whole":
            grads = mlo.shards.part(level, mlo.distributed.average(grads))
        out[name] = {"calls": torch.cat([c.detach().ravel() for c in calls]),
                     "grads": torch.cat([g.ravel() for g in grads.values()])}
    for _ in range(STEPS):
        program.step()
    out["params"] = params_now()
    return out


def test_units_inside_units_and_parameters_of_the_module_itself(tmp_path):
    results = forked(nested_units, tmp_path, timeout=60.0)
    for result in results:
        assert torch.allclose(result["shards"]["calls"], result["whole"]["calls"], atol=1e-12,
                              rtol=0)
        assert torch.allclose(result["shards"]["grads"], result["whole"]["grads"], atol=1e-12,
                              rtol=0)
    program, params_now = blocks_program(batches(1, 2 * BATCH), batches(2, 2 * BATCH))
    for _ in range(STEPS):
        program.step()
    assert torch.allclose(results[0]["params"], params_now(), atol=1e-10, rtol=0)


def checkpointed(rank, folder):
    """An uninterrupted 8-step run of a sharded level (Adam, dropout, unroll 2 under itd), then
    5 steps with checkpoints and a resume to 8 from the last one, inside an unroll window."""
    def program(sharded=True):
        mlo.registry.clear()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.3), nn.Linear(4, 1))
        scales = nn.Parameter(torch.zeros(5))
        data = TensorDataset(torch.randn(24, 5), torch.randn(24, 1))

        @mlo.level(module=net, optimizer=torch.optim.Adam(net.parameters(), lr=0.05),
                   data=DataLoader(data, batch_size=4, shuffle=True), unroll=2, shard=sharded)
        def inner(batch, module, outer):
            x, y = batch
            return ((module(x * outer().exp()) - y) ** 2).mean()

        @mlo.level(module=scales, optimizer=torch.optim.Adam([scales], lr=0.1),
                   data=DataLoader(data, batch_size=6, shuffle=True), hypergrad="itd")
        def outer(batch, inner):
            x, y = batch
            return ((inner(x) - y) ** 2).mean()

        return mlo.Program(inner, outer), net, scales

    def params(net, scales):
        return torch.cat([_full(p).ravel() for p in net.parameters()] + [scales.detach()])

    result, resumed = interrupted(program, params, folder)
    try:
        program(sharded=False)[0].load_state_dict(resumed.state_dict())
    except mlo.CheckpointError as error:
        result["unsharded"] = str(error)
    return result


def test_a_sharded_program_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    folder = tmp_path / "run"
    results = forked(checkpointed, tmp_path, str(folder), timeout=60.0)
    for result in results:
        assert result["step"] == 8 and torch.equal(result["resumed"], result["expected"])
    assert torch.equal(results[0]["expected"], results[1]["expected"])
    assert results[0]["unsharded"] == (
        "Program.load_state_dict: level 'inner' was sharded (shard=True) in the checkpoint but is "
        "not here; declare it with shard=True, on as many ranks as it was saved from.")
    state = torch.load(folder / "step-000000005.rank1.pt", weights_only=True)
    weight = state["levels"]["inner"]["module"]["0.weight"]
    assert weight["shape"] == [4, 5] and weight[mlo.sharding.SHARD].shape == (2, 5)  # a shard
    assert state["windows"]["outer/inner"]["params"]["0.weight"][mlo.sharding.SHARD].shape == (2, 5)


def misuse(rank, case):
    """One wrong use of a sharded level on 2 ranks (a failed step ends the process group, so
    one per run): the error it raises."""
    train, val = shard(batches(1, 2 * BATCH), rank), shard(batches(2, 2 * BATCH), rank)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    scales = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    if case == "sharded_before":
        from torch.distributed.fsdp import fully_shard
        fully_shard(net)

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=train,
               shard=True)
    def inner(batch, module, outer):
        x, y = batch
        if case == "around":  # calls the network object, not its handle
            return ((net(x * outer().exp()) - y) ** 2).mean()
        penalty = module[0].weight.pow(2).sum() if case == "weight_decay" else 0.0
        return ((module(x * outer().exp()) - y) ** 2).mean() + penalty

    @mlo.level(module=scales, optimizer=torch.optim.SGD([scales], lr=0.5), data=val,
               hypergrad="aid_fd")
    def outer(batch, inner):
        x, y = batch
        if case == "upper_around":  # harmless without sharding: the same live parameters
            return ((net(x) - y) ** 2).mean()
        return ((inner(x) - y) ** 2).mean()

    program = mlo.Program(inner, outer)
    for _ in range(2):
        program.step()
    return {}


@pytest.mark.parametrize("case, kind, message", [
    ("around", "DistributedError", r"Program.step \(step 0\): level 'outer' failed on rank \d of 2 "
                                   r"\(HandleError: Program.step \(step 0\): level 'inner' reads "
                                   r"its network directly"),
    ("weight_decay", "DistributedError", r"Program.step \(step 0\): level 'inner' failed on rank "
                                         r"\d of 2 \(HandleError: level 'inner' is sharded "
                                         r"\(shard=True\): in its real steps its parameters are "
                                         r"this rank's shards outside a call of its module"),
    ("upper_around", "DistributedError", r"Program.step \(step 0\): level 'outer' failed on rank "
                                         r"\d of 2 \(HandleError: Program.step \(step 0\): level "
                                         r"'outer' calls the network of sharded level 'inner' "
                                         r"directly instead of through the handle 'inner'"),
    ("sharded_before", "LevelError", r"@level 'inner': the module is already sharded by "
                                     r"fully_shard; pass the unsharded module"),
])
def test_wrong_uses_of_a_sharded_level_on_two_ranks_raise_naming_the_level(tmp_path, case, kind,
                                                                           message):
    for result in forked(misuse, tmp_path, case):
        assert result["error"] == kind
        assert re.match(message, result["message"]), result["message"]


@pytest.mark.parametrize("options, message", [
    (dict(hypergrad="aid_cg"), r"@level 'bad': shard=True with hypergrad='aid_cg': a sharded level "
                               r"cannot have a hypergradient of its own; shard the lower levels"),
    (dict(fp16=True), r"@level 'bad': shard=True with fp16=True is not supported"),
    (dict(compile=True), r"@level 'bad': shard=True with compile=True is not supported"),
    (dict(activation_checkpointing=True), r"shard=True with activation_checkpointing=True"),
    (dict(shard="yes"), r"@level 'bad': shard must be True or False, got 'yes'"),
])
def test_shard_refuses_options_it_does_not_support(parts, options, message):
    options = {"shard": True, **options}
    with pytest.raises(mlo.LevelError, match=message):
        mlo.level(**parts(hypergrad=options.pop("hypergrad", None)), **options, name="bad")(
            lambda module: module(torch.ones(2)).sum())


def test_shard_refuses_a_tensor_and_a_start_from_another_level(parts):
    tensor = nn.Parameter(torch.zeros(2))
    with pytest.raises(mlo.LevelError, match=r"@level 'bad': shard=True needs an nn.Module, but "
                                             r"the module is a tensor"):
        mlo.level(module=tensor, optimizer=torch.optim.SGD([tensor], lr=0.1), shard=True,
                  name="bad")(lambda module: module.sum())

    def adapt(module, meta: mlo.Init):
        return module(torch.ones(2)).sum()

    with pytest.raises(mlo.LevelError, match=r"@level 'adapt': shard=True on a level that starts "
                                             r"from another \(mlo.Init\) is not supported"):
        mlo.level(**parts(), shard=True)(adapt)
