"""Handles behave like the modules they stand for; a cost that reads a module around its handle
(a silent zero hypergradient) is caught at the first upper step."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

import mlo
from mlo.errors import HandleError
from mlo.handle import Handle

X = torch.linspace(-1, 1, 12).reshape(4, 3)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.layers = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
        self.heads = nn.ModuleDict({"a": nn.Linear(1, 1)})
        self.scale = nn.Parameter(torch.tensor(2.0), requires_grad=False)  # frozen

    @property
    def doubled(self):
        return 2 * self.fc1.weight

    @property
    def first(self):
        return self.layers[0]

    def encode(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale

    def forward(self, x):
        return self.heads["a"](self.layers(self.encode(x)))


def net_level():
    torch.manual_seed(0)
    net = Net()
    level = mlo.level(module=net, optimizer=torch.optim.SGD(
        [p for p in net.parameters() if p.requires_grad], lr=0.1), name="net")(
        lambda module: module(X).sum())
    params = {k: p.detach().clone().requires_grad_() for k, p in level.named_parameters().items()}
    return net, level, params


def test_live_handle_attributes_are_the_modules():
    net, level, _ = net_level()
    live = Handle(level)
    assert live.fc1.weight is net.fc1.weight and live.scale is net.scale
    assert live.training is True and live.fc2.out_features == 2
    assert dict(live.named_parameters()) == dict(net.named_parameters())
    torch.testing.assert_close(live.encode(X), net.encode(X))
    assert torch.equal(live.doubled, net.doubled)
    torch.testing.assert_close(live.layers[0](X[:, :2]), net.layers[0](X[:, :2]))


def test_functional_handle_attributes_are_the_params_in_use():
    net, level, params = net_level()
    handle = Handle(level, params)
    assert handle.fc1.weight is params["fc1.weight"] and handle.fc2.bias is params["fc2.bias"]
    assert handle.layers[2].weight is params["layers.2.weight"]
    assert handle.heads["a"].bias is params["heads.a.bias"]
    assert handle.scale is net.scale  # frozen: not passed, taken from the module
    assert handle.training is True and handle.fc1.in_features == 3
    assert handle.params is params and len(handle.layers) == 3
    assert [type(m.params) for m in handle.layers] == [dict] * 3
    assert dict(handle.named_parameters()) == {**params, "scale": net.scale}
    assert handle.train.__self__ is net  # nn.Module's own API stays the module's
    torch.testing.assert_close(handle.doubled, 2 * params["fc1.weight"])
    assert torch.autograd.grad(handle.doubled.sum(), params["fc1.weight"])[0].eq(2).all()
    assert list(handle.parameters()) == list(dict(handle.named_parameters()).values())


def test_functional_handle_runs_forward_methods_and_submodules_with_the_params_in_use():
    net, level, params = net_level()
    handle = Handle(level, params)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # the live parameters now differ from the params in use
    reference = {k: p.detach().clone() for k, p in net.named_parameters()}
    for k, p in params.items():
        reference[k] = p
    torch.testing.assert_close(handle(X), functional_call(net, reference, (X,)))
    torch.testing.assert_close(handle.encode(X), functional_call(net.fc2, {
        "weight": params["fc2.weight"], "bias": params["fc2.bias"]}, (torch.tanh(functional_call(
            net.fc1, {"weight": params["fc1.weight"], "bias": params["fc1.bias"]}, (X,))),))
        * net.scale)
    hidden = torch.randn(5, 2)
    expected = hidden @ params["layers.0.weight"].T + params["layers.0.bias"]
    torch.testing.assert_close(handle.layers[0](hidden), expected)
    torch.testing.assert_close(handle.layers[:1](hidden), expected)  # a slice: by identity
    torch.testing.assert_close(handle.first(hidden), expected)  # a property: by identity
    grads = torch.autograd.grad(handle.encode(X).sum(), [params["fc1.weight"]])
    assert grads[0].abs().sum() > 0


def test_tensor_level_handle_points_to_calling_it():
    lam = nn.Parameter(torch.ones(2))
    level = mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.1), name="decay")(
        lambda: lam.sum())
    assert Handle(level)() is lam
    with pytest.raises(AttributeError, match=r"level 'decay' is a tensor of hyperparameters; call "
                       r"its handle to get the tensor: decay\(\)\.shape"):
        Handle(level).shape


def test_handle_reports_a_missing_attribute_like_the_module():
    _, level, params = net_level()
    with pytest.raises(AttributeError, match="'Net' object has no attribute 'fc3'"):
        Handle(level, params).fc3


def quadratic(method, steps):
    """Lower: ½wᵀAw − wᵀBλ written with `module.weight` (no forward call); upper: ½‖w − t‖²."""
    torch.manual_seed(0)
    A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.5]], dtype=torch.float64)
    B = torch.randn(3, 2, dtype=torch.float64)
    t = torch.randn(3, dtype=torch.float64)
    net = nn.Linear(3, 1, bias=False).double()
    lam = nn.Parameter(torch.randn(2, dtype=torch.float64))
    eta, lr = 0.1, 0.5

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=eta), unroll=steps)
    def lower(module, upper):
        w = module.weight[0]
        return 0.5 * w @ A @ w - w @ B @ upper()

    @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=lr), hypergrad=method)
    def upper(lower):
        return 0.5 * (lower.weight[0] - t).pow(2).sum()

    return mlo.Program(lower, upper), net, lam, (A, B, t, eta, lr)


def test_hypergradient_flows_through_module_weight_aid_cg():
    program, net, lam, (A, B, t, _, lr) = quadratic(mlo.hypergrad.aid_cg(iters=3), steps=1)
    before = lam.detach().clone()
    program.step()
    w = net.weight.detach()[0]
    # (dw*/dλ)ᵀ v = Bᵀ A⁻¹ v with v = ∂F/∂w = w − t: exact with CG on a 3×3 SPD system
    expected = before - lr * B.T @ torch.linalg.solve(A, w - t)
    torch.testing.assert_close(lam.detach(), expected, rtol=1e-10, atol=1e-12)


def test_hypergradient_flows_through_module_weight_itd():
    program, net, lam, (A, B, t, eta, lr) = quadratic("itd", steps=2)
    w0 = net.weight.detach()[0].clone()
    before = lam.detach().clone()
    program.step()
    program.step()
    w2 = net.weight.detach()[0]
    # two SGD steps w ← w − η(Aw − Bλ): dw2/dλ = η(I − ηA)B + ηB
    jacobian = eta * (torch.eye(3, dtype=torch.float64) - eta * A) @ B + eta * B
    torch.testing.assert_close(lam.detach(), before - lr * jacobian.T @ (w2 - t),
                               rtol=1e-10, atol=1e-12)
    assert not torch.equal(w2, w0)


# -- a cost that reads a module around its handle --------------------------------------------------

def bilevel(lower_cost, method="itd"):
    torch.manual_seed(0)
    net, lam = nn.Linear(3, 1), nn.Parameter(torch.zeros(3))

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), unroll=2)
    def lower(module, upper):
        return lower_cost(module, upper, net, lam)

    @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.1), hypergrad=method)
    def upper(lower):
        return lower(X).pow(2).mean()

    return mlo.Program(lower, upper)


@pytest.mark.parametrize("method", ["itd", "aid_cg", "aid_fd"])
def test_calling_the_network_instead_of_module_is_caught(method):
    program = bilevel(lambda module, upper, net, lam: (net(X) - 1).pow(2).mean()
                      + (upper() ** 2).sum() * net.weight.sum(), method)
    program.step()  # only the lower level steps: nothing to check yet
    with pytest.raises(HandleError, match=r"Program\.step \(step 1\): level 'lower' reads its "
                       r"network directly \(e\.g\. net\(x\)\) instead of through its 'module' "
                       r"argument: .* so the hypergradient of level 'upper' through 'lower' would "
                       r"be exactly zero\.\n .*test_handle\.py:\d+:  def lower\(module, upper\)\n"
                       r"  Use module\(x\) in the cost, not the object itself\."):
        program.step()


def test_reading_a_tensor_levels_own_tensor_directly_is_caught():
    w, lam = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.ones(3))

    @mlo.level(module=w, optimizer=torch.optim.SGD([w], lr=0.1))
    def lower(module, upper):
        return 0.5 * (w - upper()).pow(2).sum()  # w, not module()

    @mlo.level(module=lam, optimizer=torch.optim.SGD([lam], lr=0.1), hypergrad="aid_cg")
    def upper(lower):
        return lower().pow(2).sum()

    with pytest.raises(HandleError, match=r"(?s)level 'lower' reads its tensor directly instead of "
                       r"through its 'module' argument.*\n  Use module\(\) in the cost, not the "
                       r"object itself\."):
        mlo.Program(lower, upper).step()


def test_reading_a_named_tensor_level_directly_is_caught():
    program = bilevel(lambda module, upper, net, lam: (module(X) - 1).pow(2).mean()
                      + (module.weight[0] * lam).sum())
    program.step()
    with pytest.raises(HandleError, match=r"(?s)level 'lower' names 'upper' but reads its tensor "
                       r"directly instead of through the handle 'upper': .*\n  Use the handle in "
                       r"the cost: upper\(\)\."):
        program.step()


def test_calling_a_named_upper_levels_network_directly_is_caught():
    torch.manual_seed(0)
    net, wnet = nn.Linear(3, 2), nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
    y = torch.tensor([0, 1, 1, 0])

    @mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    def classifier(module, weighting):
        loss = nn.functional.cross_entropy(module(X), y, reduction="none")
        return (wnet(loss.detach()[:, None]).squeeze(1) * loss).mean()  # not weighting(...)

    @mlo.level(module=wnet, optimizer=torch.optim.SGD(wnet.parameters(), lr=0.1),
               hypergrad="aid_fd")
    def weighting(classifier):
        return nn.functional.cross_entropy(classifier(X), y)

    with pytest.raises(HandleError, match=r"(?s)Program\.step \(step 0\): level 'classifier' "
                       r"names 'weighting' but reads its network directly.*\n  Use the handle in "
                       r"the cost: weighting\(x\)\."):
        mlo.Program(classifier, weighting).step()


def test_reading_a_lower_levels_network_around_its_handle_is_caught():
    torch.manual_seed(0)
    base, head, weights = nn.Linear(3, 3), nn.Linear(3, 1), nn.Parameter(torch.zeros(3))

    @mlo.level(module=base, optimizer=torch.optim.SGD(base.parameters(), lr=0.1))
    def pretrain(module, reweight):
        return (reweight().exp() * (module(X) - X).pow(2)).mean()

    @mlo.level(module=head, optimizer=torch.optim.SGD(head.parameters(), lr=0.1))
    def finetune(module, pretrain):
        return (module(base(X)) - 1).pow(2).mean()  # base(X) bypasses the handle 'pretrain'

    @mlo.level(module=weights, optimizer=torch.optim.SGD([weights], lr=0.1), hypergrad="aid_cg")
    def reweight(finetune):
        return finetune(X).pow(2).mean()

    program = mlo.Program(pretrain, finetune, reweight)
    with pytest.raises(HandleError, match=r"(?s)Program\.step \(step 0\): level 'finetune' names "
                       r"'pretrain' but reads its network directly .* hypergradient of level "
                       r"'reweight' through 'finetune' would be exactly zero.*\n  Use the handle "
                       r"in the cost: pretrain\(x\)\."):
        program.step()


def test_a_cost_ignoring_some_parameters_is_not_an_error(monkeypatch):
    checks = []
    monkeypatch.setattr(mlo.program, "check_handles",
                        lambda program, upper: checks.append(upper) or check(program, upper))
    check = mlo.bypass.check_handles
    # a frozen branch: the bias never reaches the loss, the weight does
    program = bilevel(lambda module, upper, net, lam: (X @ module.weight[0]).pow(2).mean()
                      + (module.weight[0] * upper()).sum())
    for _ in range(6):
        program.step()
    assert program.steps == {"lower": 6, "upper": 3}
    assert checks == ["upper"]  # checked once, at the first upper step, never again


def test_rebinding_equals_functional_call_and_restores_the_module():
    """mlo.rebind.call computes functional_call's result; tied weights and reassigned parameters
    take functional_call itself; the module's own tensors are back afterwards, also after an
    error."""
    from mlo import rebind

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    params = {k: torch.randn_like(p) for k, p in net.named_parameters()}
    buffers = {k: b.clone() for k, b in net.named_buffers()}
    originals = dict(net.named_parameters())
    assert torch.equal(rebind.call(net, {**params, **buffers}, (x,), {}),
                       functional_call(net, {**params, **buffers}, (x,)))
    assert all(p is originals[k] for k, p in net.named_parameters())
    with pytest.raises(RuntimeError):
        rebind.call(net, params, (torch.randn(5, 7),), {})
    assert all(p is originals[k] for k, p in net.named_parameters())
    net[2].weight = nn.Parameter(torch.randn(2, 4))  # reassigned: the cache is rebuilt
    params["2.weight"] = torch.randn(2, 4)
    assert torch.equal(rebind.call(net, params, (x,), {}), functional_call(net, params, (x,)))
    net[2] = nn.Linear(4, 2)  # a replaced submodule: its new parameters are the ones used
    params.update({"2.weight": torch.randn(2, 4), "2.bias": torch.randn(2)})
    assert torch.equal(rebind.call(net, params, (x,), {}), functional_call(net, params, (x,)))
    tied = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    tied[1].weight = tied[0].weight
    weight = {"0.weight": torch.randn(3, 3)}
    assert rebind._slots(tied) is None
    assert torch.equal(rebind.call(tied, weight, (x,), {}), functional_call(tied, weight, (x,)))
