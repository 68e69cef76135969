"""Run by test_distributed under torchrun (2 processes): synchronised batch norm against one process's.

Every process builds the same network with BatchNorm1d and BatchNorm2d layers (affine and not, momentum and
cumulative averages), trains it for three steps under DistributedDataParallel on its half of each global
batch (uneven halves: 7 and 5 examples), and rank 0 trains a copy without DDP on whole batches. Rank 0
writes the largest differences (outputs, parameters after the steps, running statistics) as JSON to argv[1].
With a torch.compile backend as argv[2], the DDP-wrapped network runs through torch.compile.
"""
import copy
import json
import os
import sys

import torch
import torch.distributed as tdist
from torch import nn

from vaelab import distributed


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, momentum=None), nn.ReLU())
        self.head = nn.Linear(3 * 4 * 4, 5)
        self.norm = nn.BatchNorm1d(5, affine=False, eps=1e-12)  # BN-VAE's kind

    def forward(self, x):
        return self.norm(self.head(self.conv(x).flatten(1)))


def main() -> None:
    tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    job = distributed.Job(world=world, rank=rank)
    torch.manual_seed(0)
    reference = Net()
    model = copy.deepcopy(reference)
    net = job.wrap(model, torch.device("cpu"))
    if len(sys.argv) > 2:
        net = torch.compile(net, backend=sys.argv[2])
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    target, weight = torch.randn(5), torch.rand(12, 1)  # per-example weights: a loss batch norm does not cancel
    out_diff = 0.0
    for step in range(3):
        x = torch.randn(12, 2, 4, 4) * 3 + step  # the same global batch in every process
        mine = x[:7] if rank == 0 else x[7:]
        y = net(mine)
        # the loss scaled as the trainer does: DDP's average over processes is then the global batch's mean
        loss = (weight[:7] if rank == 0 else weight[7:]).mul((y - target) ** 2).sum() * (world / x.shape[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        outputs = torch.zeros(12, 5)  # every process's outputs in their rows (gloo gathers equal sizes only)
        (outputs[:7] if rank == 0 else outputs[7:]).copy_(y.detach())
        tdist.all_reduce(outputs)
        ref_y = reference(x)
        ref_loss = weight.mul((ref_y - target) ** 2).sum() / x.shape[0]
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        out_diff = max(out_diff, (outputs - ref_y.detach()).abs().max().item())
    if rank == 0:
        state, ref_state = model.state_dict(), reference.state_dict()
        diffs = {k: (state[k].double() - ref_state[k].double()).abs().max().item() for k in ref_state}
        json.dump({"kinds": kinds, "outputs": out_diff, "state": diffs}, open(sys.argv[1], "w"))
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
