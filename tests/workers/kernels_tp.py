"""torchrun worker: the vocab-parallel Triton losses on 2 ranks (gloo, Triton interpreter).

Each rank holds a vocab shard (the last one padded, as megavlm pads vocabularies for TP); rank 0
saves the losses and the gathered gradients for comparison with the one-process reference."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megavlm.kernels.cross_entropy import IGNORE_INDEX, triton_cross_entropy  # noqa: E402
from megavlm.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy  # noqa: E402

ROWS, VOCAB, HIDDEN = 13, 70, 16


def inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(ROWS, VOCAB, generator=g) * 2
    targets = torch.randint(0, VOCAB, (ROWS,), generator=g)
    targets[::5] = IGNORE_INDEX
    hidden = torch.randn(ROWS, HIDDEN, generator=g)
    weight = torch.randn(VOCAB, HIDDEN, generator=g) * 0.3
    grad_out = torch.rand(ROWS, generator=g)
    return logits, targets, hidden, weight, grad_out


def shard(t: torch.Tensor, rank: int, size: int, dim: int) -> torch.Tensor:
    padded = -(-VOCAB // size) * size
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, padded - VOCAB]
    return torch.nn.functional.pad(t, pad).chunk(size, dim)[rank].contiguous()


def gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim).narrow(dim, 0, VOCAB)


def main(out_path: str):
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    logits, targets, hidden, weight, grad_out = inputs()
    local = shard(logits, rank, size, 1).requires_grad_()
    loss = triton_cross_entropy(local, targets, VOCAB, group=dist.group.WORLD)
    loss.backward(grad_out)
    w_local = shard(weight, rank, size, 0).requires_grad_()
    h = hidden.clone().requires_grad_()
    total = fused_linear_cross_entropy(h, w_local, targets, VOCAB, group=dist.group.WORLD, chunk_size=4)
    total.backward()
    result = {"ce": loss.detach(), "ce_grad": gather(local.grad, 1), "flce": total.detach(),
              "flce_grad_h": h.grad, "flce_grad_w": gather(w_local.grad, 0)}
    if rank == 0:
        torch.save(result, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
