"""Train a ResNeXt with fused blocks on several processes: nn.SyncBatchNorm
norms (batch statistics over all processes, exchanged by the fused blocks
themselves) and DistributedDataParallel's gradient averaging.

    torchrun --nproc_per_node=2 examples/train_distributed.py --dataset digits --blocks-per-stage 1 --epochs 3

(N GPUs: --nproc_per_node=N; a torch install that cannot find the package
needs PYTHONPATH=<repository root>.) One process per GPU over nccl when GPUs
are visible: the whole model goes through nn.SyncBatchNorm.convert_sync_batchnorm
and is wrapped in DistributedDataParallel. Without GPUs, CPU processes over
gloo: PyTorch's own SyncBatchNorm raises for CPU tensors and DDP refuses
SyncBatchNorm layers on CPU modules ("SyncBatchNorm layers only work with
GPU modules"), so only the fused blocks' norms become nn.SyncBatchNorm (the
blocks exchange their statistics through torch.distributed themselves), the
stem's BatchNorm keeps per-process statistics, and the gradients are
averaged with all_reduce exactly as DDP's reducer does (sum / world size).
--backend auto runs the Triton kernels on GPUs and the reference (ATen)
backend on CPU; --backend triton on CPU runs the Triton kernels in their
interpreter (slow: keep the model small).

Options are examples/train.py's (model, data, --batch-size per process,
--lr, --dtype, --seed, ...); --compare, --resume and --amp are train.py's
only; rank 0 writes the final model's state_dict to --out/distributed.pt
(the stem's BatchNorm statistics there are rank 0's own on CPU). Each
process trains on its DistributedSampler
share of the data (the global batch is nproc x --batch-size); rank 0
evaluates and prints; at the end every process checks that all processes
hold the same parameters and synchronized running statistics. Tested on CPU
(tests/test_example_train_distributed.py); the GPU (nccl + DDP) path is
unverified: no GPU has run it.
"""

import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train as single  # noqa: E402  examples/train.py: its options, data sets, models and evaluation


def sync_batchnorm(model, whole_model):
    """nn.SyncBatchNorm.convert_sync_batchnorm of the whole model (GPUs), or
    of the fused blocks only (CPU: module docstring). Returns the model."""
    import resnext_kernels as rk

    if whole_model:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for block in [m for m in model.modules() if isinstance(m, rk.FusedResNeXtBlock)]:
        nn.SyncBatchNorm.convert_sync_batchnorm(block)  # replaces the block's norms in place
    return model


def average_gradients(model, world_size):
    """What DistributedDataParallel's reducer does: sum every gradient over
    the processes, divide by their number."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def replicas_identical(model):
    """Whether every process holds bitwise the same parameters and
    nn.SyncBatchNorm running statistics (two all_reduces: max == min)."""
    tensors = [p.detach() for p in model.parameters()]
    tensors += [b for m in model.modules() if isinstance(m, nn.SyncBatchNorm) for b in m.buffers()]
    state = torch.cat([t.double().flatten() for t in tensors])
    high, low = state.clone(), state.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return torch.equal(high, low)


def main(argv=None):
    args = single.parse_args(argv)
    if args.compare or args.resume or args.amp:
        raise SystemExit("--compare, --resume and --amp are examples/train.py's only")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if args.backend == "triton":
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by the first fused call)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)  # the same initial weights on every process
    train_set, test_set, in_channels = single.datasets(args)
    if args.limit:
        train_set = torch.utils.data.Subset(train_set, range(min(args.limit, len(train_set))))
    model = sync_batchnorm(single.build(args, in_channels, fused=True), whole_model=cuda)
    model = model.to(device, dtype, memory_format=torch.channels_last)
    trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index]) if cuda else model
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sampler = torch.utils.data.distributed.DistributedSampler(train_set, seed=args.seed)
    loader = torch.utils.data.DataLoader(train_set, args.batch_size, sampler=sampler)
    losses = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        trained.train()
        start = time.perf_counter()
        loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, images) on this process
        for x, y in loader:
            x, y = x.to(device, dtype).contiguous(memory_format=torch.channels_last), y.to(device)
            loss = nn.functional.cross_entropy(trained(x), y)  # in --dtype (no --amp here)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not cuda:
                average_gradients(model, world)
            optimizer.step()
            loss_sum += torch.tensor([loss.item() * len(y), len(y)], dtype=torch.float64, device=device)
        dist.all_reduce(loss_sum)
        losses.append((loss_sum[0] / loss_sum[1]).item())
        seconds = time.perf_counter() - start
        if rank == 0:  # eval mode: no statistics exchange, so one process may run it alone
            test_loader = torch.utils.data.DataLoader(test_set, 256)
            test_loss, test_acc = single.run_epoch(model, test_loader, device, dtype, amp=False, desc="test")
            print(f"epoch {epoch + 1}: train loss {losses[-1]:.4f} ({world} processes, {seconds:.1f} s) | "
                  f"test loss {test_loss:.4f} acc {test_acc:.3f}", flush=True)
    same = replicas_identical(model)
    if rank == 0:
        print(f"replicas identical: {same}", flush=True)
        os.makedirs(args.out, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(args.out, "distributed.pt"))
    dist.destroy_process_group()
    if not same:
        raise SystemExit(f"rank {rank}: the processes' parameters or running statistics differ")
    print(f"rank {rank}: done", flush=True)
    return losses


if __name__ == "__main__":
    main()
