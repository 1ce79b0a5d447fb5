"""Worker for tests/test_distributed.py: ``shard_modules`` on a small layer stack, under ``torchrun
--nproc_per_node 2`` (gloo) or in one process. Trains 3 SGD steps of a 4-layer MLP stack with the given FSDP2 parameter
dtype (bf16: under CPU bf16 autocast, as training on GPUs runs) and prefetch and writes, as JSON to argv[1]: the losses, the dtypes the layers'
weights had inside their forwards, the dtypes of the trained (sharded) weights and their gradients, and the final
whole weights."""

import json
import sys

import torch
from torch import nn

from hybridize.convert.distributed import full_tensor, init_distributed, shard_modules

out, param_dtype, prefetch = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = init_distributed("cpu")
torch.manual_seed(0)


class Layer(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.RMSNorm(width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Stack(nn.Module):
    def __init__(self, width=32, depth=4):
        super().__init__()
        self.layers = nn.ModuleList(Layer(width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


model = Stack()
seen = []
for layer in model.layers:
    layer.register_forward_pre_hook(lambda m, args: seen.append([str(m.up.weight.dtype), str(m.norm.weight.dtype)]))
shard_modules(list(model.layers), model, param_dtype=param_dtype, prefetch=prefetch)
opt = torch.optim.SGD(model.parameters(), lr=0.5)  # weights linear in the gradients (AdamW would amplify rounding)
data = torch.randn(3, 8, 16, 32)  # steps x global batch x tokens x width
losses = []
for step in range(3):
    x = data[step][ctx.rank :: ctx.world_size]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=param_dtype == "bf16"):
        y = model(x)
    loss = y.float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    value = loss.detach().clone()
    if ctx.enabled:
        torch.distributed.all_reduce(value)
        value /= ctx.world_size
    losses.append(float(value))
weights = {k: full_tensor(v).tolist() for k, v in model.state_dict().items()}
grad_dtypes = sorted({str(p.grad.dtype) for p in model.parameters()})
param_dtypes = sorted({str(p.dtype) for p in model.parameters()})
if ctx.is_main:
    json.dump({"losses": losses, "seen": seen, "param_dtypes": param_dtypes, "grad_dtypes": grad_dtypes, "weights": weights},
              open(out, "w"))
if ctx.enabled:
    torch.distributed.destroy_process_group()
