"""torch.distributed helpers; every one is a no-op in a single process.

Contrastive losses need features from every rank, with gradients flowing back to the rank
that produced them; validation needs the embeddings of the whole val set on every rank.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenation of `x` from every rank; the backward pass sums the gradient of the
    concatenation over ranks and hands each rank its own slice (so a rank's features get
    the gradient of every rank's loss)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = rank_and_world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def all_gather_features(x: Tensor, with_grad: bool = True) -> Tensor:
    """[W * B, ...] features of all ranks in rank order (every rank must pass the same shape).

    `with_grad=False` gathers without autograd and puts the local tensor back in its slot
    (open_clip's cheaper variant): gradients then reach only the local features, which
    drops the other ranks' loss terms from this rank's gradient.
    """
    rank, world = rank_and_world()
    if world == 1:
        return x
    if with_grad:
        return _AllGatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    with torch.no_grad():
        dist.all_gather(parts, x.contiguous())
    parts[rank] = x
    return torch.cat(parts)


def _ring_shift(x: Tensor, offset: int) -> Tensor:
    """Send `x` to rank + offset, receive from rank - offset (mod world)."""
    rank, world = rank_and_world()
    received = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x.contiguous(), (rank + offset) % world),
        dist.P2POp(dist.irecv, received, (rank - offset) % world),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _NeighbourExchange(torch.autograd.Function):
    """The previous rank's tensor; the gradient travels back to the rank it came from."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _ring_shift(x, +1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _ring_shift(grad, -1)


def neighbour_exchange(x: Tensor) -> Tensor:
    """`x` of rank - 1 (ring order), differentiable; the identity in a single process."""
    if rank_and_world()[1] == 1:
        return x
    return _NeighbourExchange.apply(x)


def gather_variable(x: Tensor) -> Tensor:
    """Concatenate tensors whose first dimension differs across ranks (no gradient)."""
    _, world = rank_and_world()
    if world == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    longest = int(max(s.item() for s in sizes))
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def gather_objects(items: list) -> list:
    """Concatenation of every rank's python list, in rank order."""
    _, world = rank_and_world()
    if world == 1:
        return items
    gathered: list[list | None] = [None] * world
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def weights_digest(module: nn.Module) -> str:
    """sha256 of every parameter, to check that ranks hold the same weights. Buffers are
    left out: BatchNorm statistics are updated by each rank's own batches (DDP copies
    rank 0's at the start of the next forward)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def ranks_agree(value: object) -> bool:
    """True when every rank passes an equal (hashable) value; always true in one process."""
    return len(set(gather_objects([value]))) == 1


def full_params(model: nn.Module | None) -> contextlib.AbstractContextManager:
    """Context in which an FSDP model's weights are whole, so its submodules can run
    outside the wrapped forward (e.g. encoding prompts after validation); else a no-op."""
    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(model, writeback=False)
    return contextlib.nullcontext()
