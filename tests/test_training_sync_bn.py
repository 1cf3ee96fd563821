"""Multi-process training with nn.SyncBatchNorm norms (issue 12): the fused
training path with its batch statistics exchanged over a torch.distributed
process group (common/process_group_exchange.py).

Multi-process checks run in 2 processes started once per test with
torch.multiprocessing (spawn): on CPU over gloo, the Triton kernels under the
interpreter (TRITON_INTERPRET=1 is set by conftest before triton is imported
and inherited by the children, which check it). PyTorch itself cannot run
this on CPU: nn.SyncBatchNorm raises for CPU tensors and DDP refuses
SyncBatchNorm layers on CPU modules ("SyncBatchNorm layers only work with
GPU modules"), so the CPU children average the parameter gradients with
all_reduce exactly as DDP's reducer does (sum over ranks / world size). The
nccl + DistributedDataParallel variant needs two GPUs (marked cuda).

The reference: one process running the whole global batch through fp64
torchvision blocks with plain BatchNorm2d (SyncBatchNorm over the ranks is
BatchNorm over the global batch; DDP's gradients are the global gradients /
world size). Tolerance: issue 11's rule, 3x the error of eager PyTorch at
the dtype (training_cases.close).

Nothing can hang the suite: the parent waits at most SPAWN_TIMEOUT_S and
kills the children; the children's collectives time out after
COLLECTIVE_TIMEOUT_S (the process group's timeout).
"""

import copy
import datetime
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import randomize_norms
from torch import nn
from torchvision.models.resnet import Bottleneck
from training_cases import HAS_CUDA, OpRecorder, close, forbidden_ops

import resnext_kernels as rk
from resnext_kernels import FusedResNeXtBlock
from resnext_kernels.backends import registry
from resnext_kernels.common.batch_stats import BatchNormArgs
from resnext_kernels.common.process_group_exchange import ProcessGroupExchange
from resnext_kernels.ops import training

F64 = torch.float64
WORLD = 2
BATCHES = (3, 2)  # images per rank: unequal on purpose (counts differ between ranks)
H, W = 7, 5  # the stage's input; its stride-2 projection block makes it 4 x 3
HO, WO = 4, 3
CIN, COUT = 8, 16  # planes 4, 2 groups of d = 4: width 8
STEPS = 2
LR = 0.1
SPAWN_TIMEOUT_S = 240
COLLECTIVE_TIMEOUT_S = 120
# Collectives one training step of the stage issues (docs/training.md):
# per block 3 all_gathers in forward (bn1; bn2; bn3 with bn_d) and 3
# all_reduces in backward (tail; bn2; bn1), with or without a projection.
GATHERS_PER_STEP = REDUCES_PER_STEP = 2 * 3
# nn.SyncBatchNorm's: one all_gather per norm in forward, one all_reduce per
# norm in backward (torch/nn/modules/_functions.py): 4 + 3 norms.
SYNC_BN_GATHERS_PER_STEP = SYNC_BN_REDUCES_PER_STEP = 4 + 3


def _stage():
    """A small ResNeXt stage in float64 with plain BatchNorm2d (random affine
    parameters and running stats): a stride-2 projection block and an
    identity block, 2 groups of 4 channels."""
    down = nn.Sequential(nn.Conv2d(CIN, COUT, 1, stride=2, bias=False), nn.BatchNorm2d(COUT))
    stage = nn.Sequential(Bottleneck(CIN, 4, 2, down, groups=2, base_width=64),
                          Bottleneck(COUT, 4, groups=2, base_width=64))
    return randomize_norms(stage).to(F64).train()


def _step(model, x, g):
    """Forward and backward: (out, x.grad, {name: param grad}); grads zeroed first."""
    model.zero_grad(set_to_none=True)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = model(x)
    y.backward(g)
    return y.detach(), x.grad, {n: p.grad for n, p in _bare(model).named_parameters()}


def _bare(model):
    """The model inside a DistributedDataParallel wrapper, or the model."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _sync_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]


# The Python entry points of the collectives counted, per kind.
_COLLECTIVES = {"all_gather": ("all_gather", "all_gather_into_tensor", "all_gather_single"),
                "all_reduce": ("all_reduce",)}


class _CountCollectives:
    """Counts the torch.distributed all-gathers and all-reduces called while
    active, whatever their Python entry point (the fused exchange's and
    nn.SyncBatchNorm's alike; DDP's reducer runs in C++ and is not counted)."""

    def __init__(self):
        self.calls = dict.fromkeys(_COLLECTIVES, 0)

    def __enter__(self):
        self.saved = {name: getattr(dist, name) for names in _COLLECTIVES.values() for name in names
                      if hasattr(dist, name)}
        for kind, names in _COLLECTIVES.items():
            for name in names:
                if name not in self.saved:
                    continue

                def counted(*args, _kind=kind, _real=self.saved[name], **kwargs):
                    self.calls[_kind] += 1
                    return _real(*args, **kwargs)
                setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, real in self.saved.items():
            setattr(dist, name, real)


# -- the checks run by each process ----------------------------------------------


def _check_stage_training(rank, world, device, ddp):
    """Two training steps (an SGD step between them) of the stage on this
    rank's slice of a global batch, through fused blocks with SyncBatchNorm
    norms on both training backends: the triton one converted by rk.convert
    then convert_sync_batchnorm (WORLD), the reference one the other way
    round over a process group of its own (so rk.convert deep-copies norms
    holding a ProcessGroup). Each rank's output and input gradient equal its
    slice of the global-batch reference, its averaged parameter gradients
    the global gradients / world size, and after the steps its running
    statistics and num_batches_tracked the reference's. `ddp`: wrap the
    models in DistributedDataParallel (GPU), whose averaged gradients and
    eager torchvision with nn.SyncBatchNorm under DDP set the tolerance;
    else all_reduce averages and eager one-process fp32 sets it."""
    dev = torch.device(device, rank) if device == "cuda" else torch.device(device)
    ref = _stage()  # identical on every rank: same seed
    own_group = dist.new_group(list(range(world)))  # every rank creates every group, in the same order
    fused = {
        "triton": nn.SyncBatchNorm.convert_sync_batchnorm(rk.convert(copy.deepcopy(ref), backend="triton")),
        "reference": rk.convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref), process_group=own_group),
                                backend="reference"),
    }
    for name, model in fused.items():
        assert all(isinstance(b, FusedResNeXtBlock) for b in model), name
        assert len(_sync_norms(model)) == 7, name  # 3 + 3 norms and the projection's
    assert all(bn.process_group is own_group for bn in _sync_norms(fused["reference"]))
    fused = {name: m.to(device=dev, dtype=torch.float32) for name, m in fused.items()}
    if ddp:
        eager = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref)).to(device=dev, dtype=torch.float32)
        eager = nn.parallel.DistributedDataParallel(eager, device_ids=[rank])
        fused = {name: nn.parallel.DistributedDataParallel(m, device_ids=[rank]) for name, m in fused.items()}
    else:
        eager = copy.deepcopy(ref).float()  # one process, the global batch, fp32
    models = {"ref": ref, "eager": eager, **fused}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9) for name, m in models.items()}
    lo, hi = sum(BATCHES[:rank]), sum(BATCHES[:rank + 1])
    for step in range(STEPS):
        x = torch.randn(sum(BATCHES), CIN, H, W, dtype=F64)  # the same on every rank: same seed
        g = torch.randn(sum(BATCHES), COUT, HO, WO, dtype=F64)
        expect = _step(ref, x, g)
        if ddp:  # eager nn.SyncBatchNorm under DDP on this rank's slice
            with _CountCollectives() as collectives:
                base = _step(eager, x[lo:hi].to(dev, torch.float32), g[lo:hi].to(dev, torch.float32))
            assert collectives.calls == {"all_gather": SYNC_BN_GATHERS_PER_STEP,
                                         "all_reduce": SYNC_BN_REDUCES_PER_STEP}, ("nn.SyncBatchNorm", collectives.calls)
        else:
            base = _step(eager, x.float(), g.float())
            base = (base[0][lo:hi], base[1][lo:hi], base[2])
        for model in (ref, eager) if not ddp else (ref,):
            for p in model.parameters():
                p.grad /= world  # what DDP's averaging gives: the global gradients / world size
        for name, model in fused.items():
            with _CountCollectives() as collectives, OpRecorder() as ops:
                got = _step(model, x[lo:hi].to(dev, torch.float32), g[lo:hi].to(dev, torch.float32))
            assert collectives.calls == {"all_gather": GATHERS_PER_STEP, "all_reduce": REDUCES_PER_STEP}, \
                (name, collectives.calls)
            # The block level (outside the ops: the norms' bookkeeping, no ATen fallback); inside the
            # triton backend: _check_backends_inside.
            assert {"resnext_kernels.bottleneck_training", "resnext_kernels.bottleneck_training_backward"} <= ops.seen
            assert not forbidden_ops(ops.seen), (name, forbidden_ops(ops.seen))
            if not ddp:
                for p in model.parameters():  # DDP's reducer: all_reduce (sum), divided by the world size
                    dist.all_reduce(p.grad)
                    p.grad /= world
            what = f"rank {rank} {name} step {step}"
            close(f"{what} out", got[0].cpu(), expect[0][lo:hi], base[0].cpu())
            close(f"{what} x.grad", got[1].cpu(), expect[1][lo:hi], base[1].cpu())
            assert got[2].keys() == expect[2].keys()
            for pname in expect[2]:
                close(f"{what} {pname}.grad", got[2][pname].cpu(), expect[2][pname], base[2][pname].cpu())
        for opt in optimizers.values():
            opt.step()
    ref_buffers = dict(ref.named_buffers())
    base_buffers = dict(_bare(eager).named_buffers())
    for name, model in fused.items():
        for bname, buf in _bare(model).named_buffers():
            if bname.endswith("num_batches_tracked"):
                assert buf.item() == ref_buffers[bname].item() == STEPS, (name, bname)
            else:
                close(f"rank {rank} {name} {bname}", buf.cpu(), ref_buffers[bname], base_buffers[bname].cpu())
        # Every rank merges the same gathered rows in the same order: identical statistics.
        mine = torch.cat([b.flatten().double() for b in _bare(model).buffers()])
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        assert all(torch.equal(e, everyone[0]) for e in everyone), f"{name}: running statistics differ between ranks"
    rk.unconvert(_bare(fused["reference"]))  # back to torchvision, keeping the norms and their group
    assert all(type(b) is Bottleneck for b in _bare(fused["reference"]))
    assert all(bn.process_group is own_group for bn in _sync_norms(_bare(fused["reference"])))


def _check_backends_inside(rank, world, device):
    """The triton backend's forward and backward with the process-group
    exchange run no ATen convolution or batch norm (inside the op, where
    the module-level recorder cannot see) but do run the collectives, 3
    all_gathers and 3 all_reduces for a projection block; the reference
    backend under the same recorder shows convolutions and batch norms."""
    block = _stage()[0].to(device=device, dtype=torch.float32)
    norms = [block.bn1, block.bn2, block.bn3, block.downsample[1]]
    w = [block.conv1.weight.detach(), block.conv2.weight.detach(), block.conv3.weight.detach(),
         block.downsample[0].weight.detach()]
    x = torch.randn(BATCHES[rank], CIN, H, W, device=device).contiguous(memory_format=torch.channels_last)
    exchange = ProcessGroupExchange(dist.group.WORLD)
    for backend in ("triton", "reference"):
        forward, backward = registry.training_kernels(backend)
        args = [BatchNormArgs(bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var, True, 0.1,
                              bn.eps) for bn in norms]
        with OpRecorder() as inside:
            saved = forward(x, *w, args, 2, 1, 2, exchange=exchange)
            backward(torch.randn_like(saved[0]), x, *w, *saved[:6], [a[:2] for a in args], [True] * 4, 2, 1, 2,
                     True, exchange=exchange)
        c10d = {op: k for op, k in inside.counts.items() if op.startswith("c10d.")}
        assert c10d == {"c10d._allgather_base_": 3, "c10d.allreduce_": 3}, (backend, c10d)
        found = forbidden_ops(inside.seen)
        if backend == "triton":
            assert not found, found
        else:  # the recorder sees what runs: it can fail
            assert any("convolution" in op for op in found) and any("batch_norm" in op for op in found), found


def _check_empty_rank(rank, world, device):
    """One rank with an empty batch (issue 20): it takes part in every
    collective with a zero count, as nn.SyncBatchNorm's empty rank does, so
    no rank raises or waits; the other rank's output and input gradient,
    every rank's averaged parameter gradients and running statistics equal
    the global-batch reference's (the global batch is the non-empty rank's),
    num_batches_tracked counts the step on both ranks, and the empty rank's
    output and x.grad are empty."""
    batches = (3, 0)  # rank 1 has no images
    lo, hi = sum(batches[:rank]), sum(batches[:rank + 1])
    ref = _stage()
    fused = {"triton": nn.SyncBatchNorm.convert_sync_batchnorm(rk.convert(copy.deepcopy(ref), backend="triton")),
             "reference": nn.SyncBatchNorm.convert_sync_batchnorm(rk.convert(copy.deepcopy(ref), backend="reference"))}
    fused = {name: m.to(device=device, dtype=torch.float32) for name, m in fused.items()}
    eager = copy.deepcopy(ref).float()
    x = torch.randn(sum(batches), CIN, H, W, dtype=F64)
    g = torch.randn(sum(batches), COUT, HO, WO, dtype=F64)
    expect, base = _step(ref, x, g), _step(eager, x.float(), g.float())
    for model in (ref, eager):
        for p in model.parameters():
            p.grad /= world
    for name, model in fused.items():
        with _CountCollectives() as collectives:
            got = _step(model, x[lo:hi].to(device, torch.float32), g[lo:hi].to(device, torch.float32))
        assert collectives.calls == {"all_gather": GATHERS_PER_STEP, "all_reduce": REDUCES_PER_STEP}, \
            (name, collectives.calls)
        what = f"rank {rank} (batch {hi - lo}) {name}"
        assert got[0].shape == (hi - lo, COUT, HO, WO) and got[1].shape == (hi - lo, CIN, H, W), what
        if hi > lo:
            close(f"{what} out", got[0].cpu(), expect[0][lo:hi], base[0][lo:hi])
            close(f"{what} x.grad", got[1].cpu(), expect[1][lo:hi], base[1][lo:hi])
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        for pname, p in model.named_parameters():
            close(f"{what} {pname}.grad", p.grad.cpu(), expect[2][pname], base[2][pname])
        ref_buffers, base_buffers = dict(ref.named_buffers()), dict(eager.named_buffers())
        for bname, buf in model.named_buffers():
            if bname.endswith("num_batches_tracked"):
                assert buf.item() == 1, (what, bname)
            else:
                close(f"{what} {bname}", buf.cpu(), ref_buffers[bname], base_buffers[bname])


def _check_group_rules(rank, world, device):
    """nn.SyncBatchNorm's rules with an initialized group of 2: a norm whose
    process group has one process, or a block in eval mode, behaves as
    BatchNorm2d (bitwise the same as the block with plain norms); the norms
    of one block over different groups, or mixing synchronized and local
    batch statistics, raise ValueError before any collective."""
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    pair = dist.new_group(list(range(world)))
    plain = FusedResNeXtBlock.from_bottleneck(_stage()[1], backend="reference")
    x = torch.randn(BATCHES[rank], COUT, HO, WO, dtype=F64)
    alone = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain), process_group=singles[rank])
    assert isinstance(alone.bn1, nn.SyncBatchNorm)
    torch.testing.assert_close(alone(x), copy.deepcopy(plain)(x), rtol=0, atol=0)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)).eval()
    torch.testing.assert_close(synced(x), copy.deepcopy(plain).eval()(x), rtol=0, atol=0)
    synced.train().bn1.process_group = pair
    with pytest.raises(ValueError, match="share one process group"):
        synced(x)
    synced.bn1.process_group = None
    synced.bn2 = plain.bn2
    with pytest.raises(ValueError, match=r"all local: synchronized \['bn1', 'bn3'\], local \['bn2'\]"):
        synced(x)


def _check_stage_many_tiles(rank, world, device):
    """One training step of the stage's first block (the stride-2
    projection block: 4 norms, at H x W and Ho x Wo) through the triton
    backend with 16-pixel statistics tiles (_common.forced_tiling): each rank merges
    several rows per norm (merge_rows) before the exchange, and the ranks
    hold unequal counts (BATCHES), so a merge that weighs rows or ranks
    equally, or keeps only a rank's first row, fails. Output, input and
    averaged parameter gradients, and running statistics against the
    global-batch float64 reference; eager one-process fp32 sets the
    tolerance."""
    from resnext_kernels.backends.triton import _common
    from resnext_kernels.common import process_group_exchange

    ref = _stage()[:1]
    model = nn.SyncBatchNorm.convert_sync_batchnorm(rk.convert(copy.deepcopy(ref), backend="triton")).float()
    eager = copy.deepcopy(ref).float()
    rows = []
    real_merge = process_group_exchange.merge_rows
    process_group_exchange.merge_rows = lambda r: rows.append(r.count.numel()) or real_merge(r)
    lo, hi = sum(BATCHES[:rank]), sum(BATCHES[:rank + 1])
    x = torch.randn(sum(BATCHES), CIN, H, W, dtype=F64)
    g = torch.randn(sum(BATCHES), COUT, HO, WO, dtype=F64)
    expect = _step(ref, x, g)
    base = _step(eager, x.float(), g.float())
    try:
        with _common.forced_tiling(pixels=16):
            got = _step(model, x[lo:hi].float(), g[lo:hi].float())
    finally:
        process_group_exchange.merge_rows = real_merge
    # bn1 (the rank's H x W pixels), then the Ho x Wo norms: 16-pixel tiles.
    assert rows[0] == -(-BATCHES[rank] * H * W // 16) and min(rows) == -(-BATCHES[rank] * HO * WO // 16) > 1, rows
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    what = f"rank {rank} many tiles"
    close(f"{what} out", got[0], expect[0][lo:hi], base[0][lo:hi])
    close(f"{what} x.grad", got[1], expect[1][lo:hi], base[1][lo:hi])
    for pname in expect[2]:
        close(f"{what} {pname}.grad", got[2][pname], expect[2][pname] / world, base[2][pname] / world)
    base_buffers = dict(eager.named_buffers())
    for bname, buf in model.named_buffers():
        if not bname.endswith("num_batches_tracked"):
            close(f"{what} {bname}", buf, dict(ref.named_buffers())[bname], base_buffers[bname])


CHECKS = {"stage": lambda rank, world, device: _check_stage_training(rank, world, device, ddp=False),
          "stage_ddp": lambda rank, world, device: _check_stage_training(rank, world, device, ddp=True),
          "backends": _check_backends_inside, "groups": _check_group_rules, "empty_rank": _check_empty_rank,
          "many_tiles": _check_stage_many_tiles}


def _worker(rank, world, port, seed, device, checks):
    """One process: joins the group, runs `checks` (names in CHECKS) with
    the same seed as the other ranks, prints each one's time."""
    if device == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "the children must run Triton under the interpreter"
        torch.set_num_threads(1)  # two processes on a 2-core machine; tiny ops (tests/fidelity_cases.one_thread)
    else:
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        for name in checks:
            torch.manual_seed(seed)
            start = time.perf_counter()
            CHECKS[name](rank, world, device)
            print(f"rank {rank}: {name} passed in {time.perf_counter() - start:.1f} s", flush=True)
    finally:
        dist.destroy_process_group()
    # Every check passed: leave without interpreter finalization, where torch
    # 2.14's gloo now and then aborts a process that has finished ("terminate
    # called without an active exception"; tests/test_example_train_distributed.py
    # measures it, with and without this package).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(checks, device="cpu"):
    """Run `checks` in WORLD processes; a child's exception fails the test
    with its traceback; no result within SPAWN_TIMEOUT_S kills them all."""
    seed = int(torch.randint(2**31, (1,)))  # from the test's seed: the replay command reproduces it
    context = mp.start_processes(_worker, args=(WORLD, _free_port(), seed, device, checks), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {WORLD} processes did not finish {checks} within {SPAWN_TIMEOUT_S} s (a collective "
                        f"waiting for a lost peer?)")


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible: Triton does not run under the interpreter here (the "
                    "two-GPU nccl test is this check on GPUs)")
@pytest.mark.skipif(registry.unavailable_reason("triton", "cpu") is not None,
                    reason=f"triton backend unusable on CPU: {registry.unavailable_reason('triton', 'cpu')}")
def test_two_gloo_processes_train_a_sync_batchnorm_stage_as_one_global_batch():
    """Two CPU processes over gloo (module docstring): the stage's training
    steps on both backends, the collectives per step, the backends' inside,
    nn.SyncBatchNorm's group rules, a rank with an empty batch, a step
    with many statistics tiles per rank (_check_stage_many_tiles); all in
    the same processes: a spawn costs ~30 s here."""
    _spawn(["stage", "backends", "groups", "empty_rank", "many_tiles"])


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"needs two GPUs for nccl + DistributedDataParallel ({torch.cuda.device_count()} visible)")
def test_two_gpus_nccl_ddp_train_a_sync_batchnorm_stage_as_one_global_batch():
    """The same stage on two GPUs over nccl, wrapped in
    DistributedDataParallel, against the global-batch reference with eager
    torchvision nn.SyncBatchNorm under DDP as the tolerance baseline.
    Unverified: no machine with two GPUs has run it."""
    _spawn(["stage_ddp", "backends", "groups"], device="cuda")


# -- one process -------------------------------------------------------------------


def test_sync_batchnorm_norms_are_accepted_by_every_constructor():
    """nn.SyncBatchNorm norms: norm_layer=, from_modules, from_bottleneck,
    convert_sync_batchnorm after rk.convert (in place, both modes), rk.convert
    of a model that already has them, and rk.unconvert keeping them."""
    block = FusedResNeXtBlock(16, 4, groups=2, norm_layer=nn.SyncBatchNorm)
    assert isinstance(block.bn1, nn.SyncBatchNorm)
    tv = nn.SyncBatchNorm.convert_sync_batchnorm(_stage())
    fused = FusedResNeXtBlock.from_bottleneck(tv[0])
    assert isinstance(fused.downsample[1], nn.SyncBatchNorm)
    FusedResNeXtBlock.from_modules(*(getattr(tv[1], n) for n in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")),
                                   None)
    for mode in (True, False):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(rk.convert(_stage().train(mode)))
        assert all(isinstance(b, FusedResNeXtBlock) and b.training == mode for b in model)
        assert len(_sync_norms(model)) == 7 and all(bn.training == mode for bn in _sync_norms(model))
        model(torch.randn(2, CIN, H, W, dtype=F64))
    model = rk.convert(nn.SyncBatchNorm.convert_sync_batchnorm(_stage()))
    assert all(isinstance(b, FusedResNeXtBlock) for b in model) and len(_sync_norms(model)) == 7
    rk.unconvert(model)
    assert all(type(b) is Bottleneck for b in model) and len(_sync_norms(model)) == 7


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sync_batchnorm_without_a_process_group_is_batchnorm(mode):
    """Without an initialized process group nn.SyncBatchNorm is BatchNorm2d
    (torch 2.14 falls back to F.batch_norm; it does not raise): the fused
    stage with SyncBatchNorm norms gives bitwise the result of the one with
    plain norms, outputs, gradients and buffers."""
    assert not (dist.is_available() and dist.is_initialized())
    plain = rk.convert(_stage().train(mode == "train"), backend="reference")
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    x, g = torch.randn(3, CIN, H, W, dtype=F64), torch.randn(3, COUT, HO, WO, dtype=F64)
    for a, b in zip(_step(plain, x, g), _step(synced, x, g)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for (name, a), (_, b) in zip(plain.named_buffers(), synced.named_buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_group_name_is_checked():
    """The op's group_name: a str naming a process group of this process,
    else TypeError/ValueError naming it (no initialized group here)."""
    tv = _stage()[1]
    norms = [BatchNormArgs(bn.weight, bn.bias, None, None, True, 0.1, bn.eps) for bn in (tv.bn1, tv.bn2, tv.bn3)]
    args = (torch.randn(2, COUT, 3, 3, dtype=F64), tv.conv1.weight, tv.conv2.weight, tv.conv3.weight, None, norms)
    with pytest.raises(TypeError, match="group_name must be a str"):
        training.bottleneck_training(*args, groups=2, backend="reference", group_name=0)
    with pytest.raises(ValueError, match="group_name='0': torch.distributed has no initialized process group"):
        training.bottleneck_training(*args, groups=2, backend="reference", group_name="0")
