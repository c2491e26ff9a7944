"""A demanding program for the resume test: shuffled DataLoader, dropout, momentum, a scheduler,
gradient accumulation, Adam, and ITD with an unroll window that a checkpoint cuts in the middle."""

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlo


def build():
    torch.manual_seed(0)
    x, y = torch.randn(52, 6), torch.randn(52, 1)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 1))
    decay = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(TensorDataset(x[:40], y[:40]), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(x[40:], y[40:]), batch_size=4, shuffle=True)

    @mlo.level(module=net, optimizer=opt, data=loader, unroll=3, grad_accum=2,
               scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.9))
    def regressor(batch, module, decay):
        inputs, targets = batch
        weights = sum((p ** 2).sum() for p in module.params.values())
        return ((module(inputs) - targets) ** 2).mean() + decay().exp()[0] * 1e-3 * weights

    @mlo.level(module=decay, optimizer=torch.optim.Adam([decay], lr=0.01), data=val,
               hypergrad="itd")
    def decay(batch, regressor):
        inputs, targets = batch
        return ((regressor(inputs) - targets) ** 2).mean()

    return mlo.Program(regressor, decay)


def parameters(program):
    return {f"{n}.{k}": p.detach().clone() for n, lv in program.levels.items()
            for k, p in lv.named_parameters().items()}


if __name__ == "__main__":  # python resume_program.py CHECKPOINT STEPS OUT: resume in a new process
    checkpoint, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    program = mlo.Program.load(checkpoint, *build().levels.values())
    for _ in range(steps):
        program.step()
    torch.save(parameters(program), out)
