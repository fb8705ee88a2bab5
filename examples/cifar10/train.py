"""Train an SE-ResNet on CIFAR-10 with the fused SE op.

One process (CPU or one GPU):
    python examples/cifar10/train.py --data ~/data --model se_resnet20 --epochs 180 --out runs/r20
Several GPUs (or CPU processes, gloo) with torch.distributed:
    torchrun --nproc_per_node 4 examples/cifar10/train.py --data ~/data --model se_resnet18 --out runs/r18

--data is the folder holding cifar-10-batches-py (from https://www.cs.toronto.edu/~kriz/cifar.html,
"CIFAR-10 python version"); nothing is downloaded. Each epoch appends to OUT/log.csv, redraws
OUT/curves.png, and writes OUT/last.pt (atomically: written to a temporary file, then renamed)
and OUT/best.pt when the test accuracy improves. --resume continues from OUT/last.pt exactly
where it stopped: model, optimiser, schedule, epoch and random streams (every epoch's data
order and augmentation come from (seed, epoch), so a resumed run sees the same batches as an
uninterrupted one). Checkpoints load with torch.load(weights_only=True).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms

from se_kernels.models import MODELS

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DATA_FOLDER = "cifar-10-batches-py"
LOG_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "best_acc", "seconds"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help=f"folder containing {DATA_FOLDER}")
    p.add_argument("--out", default="runs/cifar10", help="folder for log.csv, curves.png and checkpoints")
    p.add_argument("--model", default="se_resnet20", choices=sorted(m for m in MODELS if m != "se_resnet50"))
    p.add_argument("--se", default="fused", choices=["fused", "reference", "none"],
                   help="fused SE (se_kernels), the unfused reference, or no SE")
    p.add_argument("--reduction", type=int, default=16)
    p.add_argument("--epochs", type=int, default=180)
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--lr", type=float, default=0.1, help="for a total batch of 128; scaled linearly")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=["cosine", "step"], default="cosine",
                   help="cosine to 0, or x0.1 at 50%% and 75%% of the epochs")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up from 0")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-amp", action="store_true", help="on GPU: no bfloat16 autocast / channels_last")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--limit-train", type=int, default=0, help="use the first N training images (0: all)")
    p.add_argument("--limit-test", type=int, default=0, help="use the first N test images (0: all)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------
# Distributed setup: torchrun sets WORLD_SIZE, RANK and LOCAL_RANK.


class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.enabled = self.world > 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.enabled:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.enabled else 0
        self.main = self.rank == 0

    def sum(self, values: List[float]) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.enabled:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def check_replicas(self, model: nn.Module) -> None:
        """Every rank must hold the same weights after training (DDP keeps them in sync):
        compare a checksum of the parameters across ranks; rank 0 reports it."""
        if not self.enabled:
            return
        with torch.no_grad():
            checksum = sum(p.double().sum() * (i + 1) for i, p in enumerate(model.parameters()))
        local = torch.tensor([checksum.item()], dtype=torch.float64, device=self.device)
        gathered = [torch.zeros_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local)
        values = [g.item() for g in gathered]
        if len(set(values)) != 1:
            raise RuntimeError(f"replicas differ after training: parameter checksums {values}")
        if self.main:
            print(f"replicas identical on {self.world} ranks: parameter checksum {values[0]:.10g}", flush=True)

    def close(self) -> None:
        if self.enabled:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Data


class CIFAR10Files(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10, checking that the batch files are there rather than their md5
    sums (torchvision's check_integrity skips the sum when it is None), so a subset written in
    the same format loads too."""

    train_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.test_list]
    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}


def missing_data_message(root: str) -> Optional[str]:
    folder = os.path.join(root, DATA_FOLDER)
    needed = [n for n, _ in CIFAR10Files.train_list + CIFAR10Files.test_list] + ["batches.meta"]
    missing = [n for n in needed if not os.path.isfile(os.path.join(folder, n))]
    if not missing:
        return None
    return (
        f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}.\n"
        f"Put the python version of CIFAR-10 there: download cifar-10-python.tar.gz from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html and run `tar xzf cifar-10-python.tar.gz -C {root}` "
        f"(it unpacks to {DATA_FOLDER}/ with data_batch_1..5, test_batch and batches.meta). "
        f"This script never downloads."
    )


def datasets(args):
    normalize = transforms.Normalize(MEAN, STD)
    train = CIFAR10Files(args.data, train=True, transform=transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize,
    ]))
    test = CIFAR10Files(args.data, train=False, transform=transforms.Compose([transforms.ToTensor(), normalize]))
    if args.limit_train:
        train = Subset(train, range(min(args.limit_train, len(train))))
    if args.limit_test:
        test = Subset(test, range(min(args.limit_test, len(test))))
    return train, test


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def train_loader(train, args, ddp: Dist, epoch: int) -> DataLoader:
    """This epoch's batches: the order and the augmentation depend only on (seed, epoch)."""
    seed = epoch_seed(args.seed, epoch)
    if ddp.enabled:
        sampler = DistributedSampler(train, num_replicas=ddp.world, rank=ddp.rank, shuffle=True, seed=args.seed)
        sampler.set_epoch(epoch)
        order = dict(sampler=sampler)
    else:
        order = dict(shuffle=True)
    generator = torch.Generator().manual_seed(seed + ddp.rank)
    return DataLoader(
        train, batch_size=args.batch_size, drop_last=True, num_workers=args.workers, generator=generator,
        pin_memory=ddp.device.type == "cuda", persistent_workers=False, **order,
    )


def test_loader(test, args, ddp: Dist) -> DataLoader:
    """Every rank evaluates its own 1/world of the test set; the sums are reduced."""
    shard = Subset(test, range(ddp.rank, len(test), ddp.world)) if ddp.enabled else test
    return DataLoader(shard, batch_size=256, shuffle=False, num_workers=args.workers,
                      pin_memory=ddp.device.type == "cuda")


# ---------------------------------------------------------------------------------------
# Model, optimiser, schedule


def build_model(args) -> nn.Module:
    torch.manual_seed(args.seed)  # the same initial weights on every rank and for every --se
    return MODELS[args.model](num_classes=10, reduction=args.reduction, se=None if args.se == "none" else args.se)


def lr_factor(step: int, steps_per_epoch: int, args) -> float:
    """Multiplier of the base learning rate at optimiser step `step`: linear warm-up, then
    cosine to 0 or steps of x0.1 at 50% and 75% of training."""
    warmup = args.warmup_epochs * steps_per_epoch
    total = args.epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if args.schedule == "cosine":
        progress = (step - warmup) / max(1.0, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 0.1 ** sum(step >= total * f for f in (0.5, 0.75))


# ---------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_state(model, optimizer, scheduler, epoch: int, best_acc: float, args) -> dict:
    """Everything --resume needs, in types torch.load(weights_only=True) accepts."""
    py_version, py_state, py_gauss = random.getstate()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,  # epochs completed
        "best_acc": best_acc,
        "args": {k: v for k, v in vars(args).items()},
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": [py_version, list(py_state), py_gauss],
        },
    }


def save_atomically(state: dict, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic on POSIX: a crash leaves the old file or the new one


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))


# ---------------------------------------------------------------------------------------
# Logging


def append_log(path: str, row: Dict[str, float]) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def plot_curves(log_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("test_loss", "test")):
        loss_ax.plot(epochs, [float(r[key]) for r in rows], label=label)
    for key, label in (("train_acc", "train"), ("test_acc", "test")):
        acc_ax.plot(epochs, [100 * float(r[key]) for r in rows], label=label)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    best = 100 * max(float(r["test_acc"]) for r in rows)
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"accuracy (best test {best:.2f}%)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


# ---------------------------------------------------------------------------------------
# Training


def run_epoch(model, loader, optimizer, scheduler, criterion, ddp: Dist, amp: bool, train: bool, desc: str):
    """(mean loss, accuracy) over the loader, summed across ranks."""
    from tqdm import tqdm

    model.train(train)
    totals = [0.0, 0.0, 0.0]  # loss sum, correct, count
    bar = tqdm(loader, desc=desc, leave=False, disable=not ddp.main, dynamic_ncols=True)
    with torch.set_grad_enabled(train):
        for images, labels in bar:
            images = images.to(ddp.device, non_blocking=True)
            labels = labels.to(ddp.device, non_blocking=True)
            if amp:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(ddp.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(images)
                loss = criterion(logits.float(), labels)
            if train:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            n = labels.numel()
            totals[0] += loss.item() * n
            totals[1] += (logits.argmax(1) == labels).sum().item()
            totals[2] += n
            bar.set_postfix(loss=f"{totals[0] / totals[2]:.3f}", acc=f"{totals[1] / totals[2]:.3f}")
    loss_sum, correct, count = ddp.sum(totals)
    return loss_sum / max(count, 1), correct / max(count, 1)


def main(argv: Optional[List[str]] = None) -> float:
    """Trains; returns the best test accuracy."""
    args = parse_args(argv)
    message = missing_data_message(args.data)
    if message:
        print(message, file=sys.stderr)
        raise SystemExit(2)
    ddp = Dist()
    amp = ddp.device.type == "cuda" and not args.no_amp
    os.makedirs(args.out, exist_ok=True)
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")
    log_path, png_path = os.path.join(args.out, "log.csv"), os.path.join(args.out, "curves.png")

    train, test = datasets(args)
    model = build_model(args).to(ddp.device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    lr = args.lr * args.batch_size * ddp.world / 128
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # BN and biases
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, momentum=args.momentum, nesterov=True,
    )
    steps_per_epoch = len(train) // (args.batch_size * ddp.world)
    if steps_per_epoch == 0:
        raise SystemExit(f"the training set ({len(train)} images) is smaller than one batch of "
                         f"{args.batch_size} x {ddp.world} processes")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, args))

    start_epoch, best_acc = 0, 0.0
    if args.resume:
        if not os.path.exists(last_path):
            raise SystemExit(f"--resume: no checkpoint at {last_path}")
        state = torch.load(last_path, map_location=ddp.device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_acc = state["epoch"], state["best_acc"]
        restore_rng(state["rng"])
        if ddp.main:
            print(f"resumed from {last_path} after epoch {start_epoch}", flush=True)
    elif ddp.main and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run starts a fresh log

    net = DistributedDataParallel(model, device_ids=[ddp.device] if ddp.device.type == "cuda" else None) \
        if ddp.enabled else model
    if args.compile:
        net = torch.compile(net)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    for epoch in range(start_epoch, args.epochs):
        began = time.perf_counter()
        torch.manual_seed(epoch_seed(args.seed, epoch))
        random.seed(epoch_seed(args.seed, epoch))
        train_loss, train_acc = run_epoch(net, train_loader(train, args, ddp, epoch), optimizer, scheduler,
                                          criterion, ddp, amp, True, f"epoch {epoch + 1}/{args.epochs}")
        test_loss, test_acc = run_epoch(net, test_loader(test, args, ddp), optimizer, scheduler, criterion, ddp,
                                        amp, False, "test")
        best_acc = max(best_acc, test_acc)
        if ddp.main:
            row = dict(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"], train_loss=train_loss,
                       train_acc=train_acc, test_loss=test_loss, test_acc=test_acc, best_acc=best_acc,
                       seconds=time.perf_counter() - began)
            append_log(log_path, row)
            plot_curves(log_path, png_path)
            state = checkpoint_state(model, optimizer, scheduler, epoch + 1, best_acc, args)
            if test_acc >= best_acc:
                save_atomically(state, best_path)
            save_atomically(state, last_path)
            print(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f} acc {100 * train_acc:.2f}% | "
                  f"test loss {test_loss:.4f} acc {100 * test_acc:.2f}% | best {100 * best_acc:.2f}%", flush=True)
        ddp.barrier()  # the checkpoint is written before any rank goes on (or exits)
    ddp.check_replicas(model)
    ddp.close()
    return best_acc


if __name__ == "__main__":
    main()
