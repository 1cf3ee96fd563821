"""The multi-process StatisticsExchange (issue 12): nn.SyncBatchNorm's
statistics exchange over a torch.distributed process group, for the
training op of both backends (common/batch_stats.py, the seam).

What crosses ranks is what nn.SyncBatchNorm exchanges
(torch/nn/modules/_functions.py), per norm:
  * forward, before the finalize: each rank's statistics merged into one
    row (count, mean [C], M2 [C]), all-gathered (counts may differ between
    ranks: the rows carry them); every rank then merges the same rows in
    the same (rank) order, so all ranks normalize with bitwise-identical
    statistics. nn.SyncBatchNorm gathers (mean, invstd, count): the same
    information, without the eps round trip.
  * backward, before BN's coefficients: (sum dz, sum dz*xhat), all-reduced
    (SUM), and this rank's count with them in the same tensor, so that the
    coefficients divide by the group's count without another collective
    (nn.SyncBatchNorm all-reduces (sum_dy, sum_dy_xmu) and keeps the
    gathered counts from forward). The BN weight and bias gradients stay
    this rank's own, as nn.SyncBatchNorm's do: DistributedDataParallel
    averages them with the other parameters.
Batched: the norms finalized at one point of the block share one
collective (bn3 and bn_d; the tail's backward sums), so a block issues 3
all_gathers in forward and 3 all_reduces in backward, with or without a
projection (docs/training.md counts them against nn.SyncBatchNorm's).

Collectives are torch.distributed's own on the group: the all-gather into
one tensor (all_gather_single, all_gather_into_tensor before torch 2.14),
which gloo and nccl both support (nn.SyncBatchNorm uses it on nccl; on gloo
it still gathers into a list of tensors), and all_reduce; synchronous
(async_op=False) as nn.SyncBatchNorm's; their timeout is the group's.
Verified on CPU processes over gloo (tests/test_training_sync_bn.py); the
nccl path is written the same way and is unverified on GPUs.
"""

import torch

from .batch_stats import StatisticsExchange, StatisticsRows, merge_rows


def _distributed():
    """torch.distributed, or ValueError when this torch build has none."""
    if not torch.distributed.is_available():
        raise ValueError("group_name was given but torch.distributed is not available in this torch build")
    return torch.distributed


def resolve_group(group_name):
    """The ProcessGroup registered under `group_name` (ProcessGroup.group_name,
    as torch's functional collectives name groups); ValueError when there is
    none."""
    if not isinstance(group_name, str):
        raise TypeError(f"group_name must be a str (a ProcessGroup's group_name) or None, "
                        f"got {type(group_name).__name__}")
    dist = _distributed()
    if not dist.is_initialized():
        raise ValueError(f"group_name={group_name!r}: torch.distributed has no initialized process group "
                         "(call torch.distributed.init_process_group first)")
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(group_name)
    except RuntimeError as exc:
        raise ValueError(f"group_name={group_name!r} names no process group of this process: {exc}") from None


def all_gather_single(output, local, group):
    """torch.distributed's all-gather into one tensor: `output` [world_size *
    L] gets every rank's `local` [L], concatenated in the group's rank order
    (the form gloo accepts; nccl takes it too).
    all_gather_single where torch has it (2.14, which deprecates the other
    name), else all_gather_into_tensor (the same collective under its older
    name). Run on gloo with torch 2.14 only; nccl unverified."""
    dist = _distributed()
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, local, group=group)


class ProcessGroupExchange(StatisticsExchange):
    """The statistics exchange over one torch.distributed process group
    (module docstring). Every rank of the group must run the same blocks
    in the same order, as with nn.SyncBatchNorm."""

    def __init__(self, group):
        self.group = group
        self.world_size = _distributed().get_world_size(group)

    @classmethod
    def from_name(cls, group_name):
        return cls(resolve_group(group_name))

    def gather_statistics(self, rows):
        merged = [merge_rows(r) for r in rows]
        # One float64 vector per rank: [count, mean (C), M2 (C)] per norm.
        local = torch.cat([torch.cat([m.count, m.mean[0], m.m2[0]]) for m in merged])
        flat = local.new_empty(self.world_size * local.numel())
        all_gather_single(flat, local, self.group)
        table = flat.view(self.world_size, -1)  # one row per rank, in the group's rank order
        out, start = [], 0
        for m in merged:
            c = m.mean.shape[1]
            fields = table[:, start], table[:, start + 1:start + 1 + c], table[:, start + 1 + c:start + 1 + 2 * c]
            # contiguous: the finalize kernel reads the rows as dense [R, C]
            out.append(StatisticsRows(*(f.contiguous() for f in fields)))
            start += 1 + 2 * c
        return out

    def reduce_gradient_sums(self, sums, count):
        # The count rides in the same all_reduce as the sums (float64: exact to 2**53).
        flat = torch.cat([sums.reshape(-1), sums.new_full((1,), float(count))])
        dist = _distributed()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        return flat[:-1].view(sums.shape), flat[-1]


__all__ = ["ProcessGroupExchange", "all_gather_single", "resolve_group"]
