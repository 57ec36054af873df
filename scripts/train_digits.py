#!/usr/bin/env python3
"""Real-training parity: a converted (fused) CIFAR ResNet (resnet20 unless ``--depth``) and its plain nn
reference, trained side by side.

Both start from the same weights and see the same batches: scikit-learn's digits (1,797 8x8 images, upsampled to
32x32, 3 channels), a held-out 20% split. On CUDA the steps run under bf16 autocast, on CPU in fp32 (use
``--epochs 1 --steps N`` there for a quick check). Writes ``curves.json`` (per-step train losses, per-epoch
held-out loss/accuracy, the final accuracy gap in points, resnet_fast.stats()) and ``curves.png`` to
``--output``.

The data come from scikit-learn when it is installed, else from ``scripts/data/digits.csv.gz``, a byte-identical
copy of the file scikit-learn ships (UCI optdigits test set, BSD-3 via scikit-learn; a test checks the copy
against scikit-learn's), so the GPU machine, which may lack scikit-learn, runs the same data.

    python scripts/train_digits.py --output out/digits            # 30 epochs
    python scripts/train_digits.py --epochs 1 --steps 5 --output /tmp/d
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F


DIGITS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits.csv.gz")


def digits_csv_path() -> str:
    """scikit-learn's own digits.csv.gz when scikit-learn is installed, else the copy beside this script."""
    try:
        import sklearn
    except ImportError:
        return DIGITS_CSV
    return os.path.join(os.path.dirname(sklearn.__file__), "datasets", "data", "digits.csv.gz")


def read_digits(path: str):
    """(images [1797, 8, 8] float32 in 0..16, targets [1797] int64) from a digits.csv.gz (64 pixels, label)."""
    with gzip.open(path, "rt") as f:
        rows = [[float(v) for v in line.split(",")] for line in f if line.strip()]
    t = torch.tensor(rows, dtype=torch.float32)
    return t[:, :64].reshape(-1, 8, 8), t[:, 64].long()


def load_digits_32(seed: int, device):
    """(x_train, y_train, x_test, y_test): digits scaled to [0,1], upsampled to 32x32, 3 channels, standardised."""
    images, y = read_digits(digits_csv_path())
    x = images.unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


def evaluate(model, x, y, autocast):
    model.eval()
    with torch.no_grad(), autocast():
        logits = model(x).float()
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def plot(curves, path, depth=20):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        ax1.plot(c["train_loss"], label=name, alpha=0.8)
        ax2.plot(range(1, len(c["test_acc"]) + 1), c["test_acc"], marker="o", label=name)
    ax1.set(xlabel="step", ylabel="train loss", yscale="log", title=f"resnet{depth} on digits: train loss")
    ax2.set(xlabel="epoch", ylabel="held-out accuracy", title="held-out accuracy")
    ax1.legend(), ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--steps", type=int, default=None, help="at most this many steps per epoch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on at most this many held-out images")
    p.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth, 6n+2 (the tests take 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", required=True, help="folder for curves.json and curves.png")
    args = p.parse_args(argv)
    import resnet_fast
    from resnet_fast import models

    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    x_train, y_train, x_test, y_test = load_digits_32(args.seed, device)
    x_test, y_test = x_test[:args.test_limit], y_test[:args.test_limit]
    torch.manual_seed(args.seed)
    reference = models.CifarResNet(args.depth, num_classes=10, fused=False).to(device)
    fused = resnet_fast.convert(reference)  # a deep copy: same starting weights, own parameters
    runs = {"fused": fused, "reference": reference}
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    if args.steps is not None:
        steps_per_epoch = min(steps_per_epoch, args.steps)
    total = steps_per_epoch * args.epochs
    opts = {k: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
            for k, m in runs.items()}
    scheds = {k: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=args.lr, total_steps=total) for k, o in opts.items()}
    curves = {k: {"train_loss": [], "test_loss": [], "test_acc": []} for k in runs}
    resnet_fast.reset_stats()
    gen = torch.Generator().manual_seed(args.seed + 1)
    start = time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=gen).to(device)
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            for k, model in runs.items():  # same batch, same order, both models
                opts[k].zero_grad(set_to_none=True)
                with autocast():
                    loss = F.cross_entropy(model(x_train[idx]).float(), y_train[idx])
                loss.backward()
                opts[k].step()
                scheds[k].step()
                curves[k]["train_loss"].append(loss.item())
        for k, model in runs.items():
            test_loss, acc = evaluate(model, x_test, y_test, autocast)
            curves[k]["test_loss"].append(test_loss)
            curves[k]["test_acc"].append(acc)
        print(f"epoch {epoch + 1}/{args.epochs}: " + ", ".join(
            f"{k} train {c['train_loss'][-1]:.4f} held-out acc {c['test_acc'][-1]:.4f}" for k, c in curves.items()))
    diffs = [abs(a - b) for a, b in zip(curves["fused"]["train_loss"], curves["reference"]["train_loss"])]
    result = {
        "config": vars(args), "device": str(device), "dtype": "bf16 autocast" if cuda else "fp32",
        "torch": torch.__version__, "backend": resnet_fast.backend(), "seconds": time.time() - start,
        "curves": curves, "max_abs_train_loss_diff": max(diffs) if diffs else None,
        "final_test_acc": {k: c["test_acc"][-1] for k, c in curves.items()} if args.epochs else {},
        # the acceptance figure: held-out accuracy of fused minus reference, in points (within 1 is parity)
        "acc_gap_points": (100 * (curves["fused"]["test_acc"][-1] - curves["reference"]["test_acc"][-1])
                           if args.epochs else None),
        "data": digits_csv_path(),
        "stats": resnet_fast.stats(),
    }
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "curves.json"), "w") as f:
        json.dump(result, f, indent=1)
    result["plot"] = plot(curves, os.path.join(args.output, "curves.png"), args.depth)
    print(f"wrote {args.output}/curves.json" + (f" and {result['plot']}" if result["plot"] else ""))
    return result


if __name__ == "__main__":
    main()
