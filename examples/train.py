"""Train a ResNeXt with fused blocks on real data, optionally next to the same
model built from torchvision's Bottleneck.

    python examples/train.py --dataset digits --model resnext29 --cardinality 2 --width-per-group 4 \
        --epochs 3 --backend triton --out runs/digits --compare

digits: scikit-learn's bundled 8x8 handwritten digits (offline, 1797 images);
cifar10: torchvision's CIFAR10 (downloaded to --data). Writes to --out a
metrics CSV, a checkpoint after every epoch (--resume continues from it)
and, with --compare, one PNG with both models' loss and accuracy curves:
the two start from the same weights and see the same batches in the same
order. Without a GPU, --backend triton runs the Triton kernels in their CPU
interpreter (slow: use a small model).
"""

import argparse
import csv
import os
import platform
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("digits", "cifar10"), default="digits")
    p.add_argument("--data", default="data", help="where cifar10 is downloaded")
    p.add_argument("--model", choices=("resnext29", "resnext29_8x64d", "resnext29_16x64d"), default="resnext29")
    p.add_argument("--cardinality", type=int, default=2, help="groups of --model resnext29")
    p.add_argument("--width-per-group", type=int, default=4, help="group width d of --model resnext29 (stage 1)")
    p.add_argument("--blocks-per-stage", type=int, default=3, help="3 for ResNeXt-29; fewer for a quick run")
    p.add_argument("--backend", default="auto", help="auto, triton, reference (fused blocks' backend)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (fp16 with a GradScaler on CUDA)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="parameter and input dtype (float64: reference backend only; with --compare the two "
                        "curves then agree to ~1e-10)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/train")
    p.add_argument("--resume", action="store_true", help="continue from --out/<name>.pt")
    p.add_argument("--compare", action="store_true", help="also train the torchvision-Bottleneck model; plot both")
    return p.parse_args(argv)


def datasets(args):
    import torch

    if args.dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # a fixed split
        test, train = order[:360], order[360:]
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        return (torch.utils.data.TensorDataset(x[train], y[train]),
                torch.utils.data.TensorDataset(x[test], y[test]), 1)
    import torchvision.transforms as T
    from torchvision.datasets import CIFAR10

    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.ToTensor(), norm])
    return (CIFAR10(args.data, train=True, download=True, transform=train_tf),
            CIFAR10(args.data, train=False, download=True, transform=test_tf), 3)


def build(args, in_channels, fused):
    from torchvision.models.resnet import Bottleneck

    import resnext_kernels as rk

    card, width = {"resnext29": (args.cardinality, args.width_per_group),
                   "resnext29_8x64d": (8, 64), "resnext29_16x64d": (16, 64)}[args.model]
    kwargs = {"backend": args.backend} if fused else {"block": Bottleneck}
    return rk.models.ResNeXt29(card, width, num_classes=10, blocks_per_stage=args.blocks_per_stage,
                               in_channels=in_channels, **kwargs)


def run_epoch(model, loader, device, dtype, amp, optimizer=None, scaler=None, desc=""):
    """One pass over loader; trains when optimizer is given. Returns (mean loss, accuracy)."""
    import torch
    from tqdm import tqdm

    model.train(optimizer is not None)
    total, correct, loss_sum = 0, 0, 0.0
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    with torch.set_grad_enabled(optimizer is not None):
        for x, y in tqdm(loader, desc=desc, leave=False):
            x, y = x.to(device, dtype).contiguous(memory_format=torch.channels_last), y.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                logits = model(x)
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            total += len(y)
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * len(y)
    return loss_sum / total, correct / total


def train(args, name, model, train_set, test_set, device):
    """Train `model`; returns its metrics rows. Checkpoints to --out/<name>.pt after every epoch."""
    import torch

    dtype = getattr(torch, args.dtype)
    model = model.to(device, dtype, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    ckpt_path, rows, start = os.path.join(args.out, f"{name}.pt"), [], 0
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device)
        for obj, key in ((model, "model"), (optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
            obj.load_state_dict(ckpt[key])
        rows, start = ckpt["rows"], ckpt["epoch"]
    for epoch in range(start, args.epochs):
        # The data order depends on (seed, epoch) only: both models of --compare see the same batches.
        order = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, generator=order)
        test_loader = torch.utils.data.DataLoader(test_set, 256)
        t0 = time.perf_counter()
        train_loss, train_acc = run_epoch(model, train_loader, device, dtype, args.amp, optimizer, scaler,
                                          f"{name} epoch {epoch + 1}/{args.epochs}")
        scheduler.step()
        test_loss, test_acc = run_epoch(model, test_loader, device, dtype, args.amp, desc=f"{name} test")
        rows.append({"model": name, "epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
                     "test_loss": test_loss, "test_acc": test_acc, "seconds": time.perf_counter() - t0})
        print(f"{name} epoch {epoch + 1}: train loss {train_loss:.4f} acc {train_acc:.3f} | "
              f"test loss {test_loss:.4f} acc {test_acc:.3f}", flush=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rows": rows,
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1},
                   ckpt_path)
    return rows


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    # Wide translucent lines for the fused model, thin black ones on top for
    # torchvision's: where the two agree, the black line runs inside the wide one.
    styles = {"fused": {"linewidth": 5, "alpha": 0.45}, "torchvision": {"linewidth": 1, "color": "black"}}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        epochs = [r["epoch"] for r in mine]
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            for split, marker, line in (("train", "o", "-"), ("test", "s", "--")):
                ax.plot(epochs, [r[f"{split}_{key}"] for r in mine], marker=marker, linestyle=line,
                        label=f"{name} {split}", **styles.get(name, {}))
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend(fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.backend == "triton" and device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by the first fused call)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    train_set, test_set, in_channels = datasets(args)
    if args.limit:
        train_set = torch.utils.data.Subset(train_set, range(min(args.limit, len(train_set))))
    fused = build(args, in_channels, fused=True)
    models = {"fused": fused}
    if args.compare:
        eager = build(args, in_channels, fused=False)
        eager.load_state_dict(fused.state_dict())  # same keys, same weights
        models["torchvision"] = eager
    rows = []
    for name, model in models.items():
        torch.manual_seed(args.seed)
        rows += train(args, name, model, train_set, test_set, device)
    with open(os.path.join(args.out, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    dtype = ("fp16" if device.type == "cuda" else "bf16") + " autocast" if args.amp else args.dtype
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        where += ", Triton interpreter"
    title = (f"{args.dataset}, {args.model} {args.cardinality}x{args.width_per_group}d, "
             f"{args.blocks_per_stage} blocks/stage, batch {args.batch_size}: fused backend={args.backend} on "
             f"{where}, {dtype}")
    plot(rows, os.path.join(args.out, "curves.png"), title)
    print(f"wrote {args.out}/metrics.csv, {args.out}/curves.png")
    return rows


if __name__ == "__main__":
    main()
