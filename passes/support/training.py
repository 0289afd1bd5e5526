"""The training loop the torch passes share: seeded Adam (AdamW with weight decay) under a
learning-rate schedule (one-cycle by default), optional early stopping, and online augmentation,
on the loss of the net's task (passes/tasks/: cross-entropy for classification, MSE against the
input for reconstruction). The train stage trains with it; prune and weight coding fine-tune with it.

Augmentation (dataset.augment, one model per raw layout: kiln/schema/datasets.py) is drawn from
the loop's generator, on training batches only. Images without a front end are augmented as the
net sees them (pixels in [0, 1]). Formats with a front end (audio, sensor windows, images fed as
uint8) are augmented on their RAW samples (the data stage's raw_train.npz), which then run
through the front end's torch module, the graph the board's library computes (``RawBatches``);
with no augmentation set, training reads the stored features as before."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from kiln.artifacts import Layout, read_json
from kiln.errors import PassError
from kiln.schema.datasets import raw_augmented
from passes import tasks as _tasks
from passes.support import distributed as _distributed
from passes.support.common import to_tensor
from passes.tasks import LOSSES, by_objective
from passes.tasks.anomaly_detection import reconstruction_error  # noqa: F401  (prune and tests import it here)

log = logging.getLogger("kiln.train")


def augment(x, aug, gen):
    """Random rotation, brightness, contrast and blur on a float NCHW batch in [0, 1] (seeded by
    ``gen``; a setting at 0 draws nothing, so adding one leaves the others' draws as they were)."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    if aug.rotate_deg > 0:
        ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(aug.rotate_deg)
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    if aug.brightness > 0:
        x = x * (1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * aug.brightness)
    if getattr(aug, "contrast", 0) > 0:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * aug.contrast) + mean
    if aug.blur > 0:
        k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
        k = k.expand(x.shape[1], 1, 3, 3)
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1])
        pick = (torch.rand(n, 1, 1, 1, generator=gen) < aug.blur).float()
        x = pick * blurred + (1 - pick) * x
    return x.clamp_(0, 1)


def augment_audio(x, aug, gen, sample_rate: int, noise=None, noise_starts=None):
    """Time shift (zero-filled), background noise at a random SNR and gain on a float (B, L)
    batch of int16 sample values; returns int16 values (rounded, clipped), as a board would get.
    ``noise``/``noise_starts``: the noise clips, concatenated, and where each begins."""
    import torch

    n, length = x.shape
    if aug.time_shift_ms > 0:
        most = int(round(aug.time_shift_ms * sample_rate / 1000))
        shift = torch.randint(-most, most + 1, (n,), generator=gen)
        src = torch.arange(length)[None, :] - shift[:, None]  # out[t] = x[t - shift]
        inside = (src >= 0) & (src < length)
        x = torch.where(inside, x.gather(1, src.clamp(0, length - 1)), torch.zeros(()))
    if aug.noise is not None and noise is not None:
        starts = noise_starts
        ends = torch.cat([starts[1:], torch.tensor([len(noise)])])
        pick = (torch.rand(n, generator=gen) < aug.noise.prob).float()
        clip = torch.randint(0, len(starts), (n,), generator=gen)
        room = (ends - starts)[clip] - length + 1  # every clip is at least one sample set long
        offset = (torch.rand(n, generator=gen) * room).long()
        seg = noise[(starts[clip] + offset)[:, None] + torch.arange(length)[None, :]]
        lo, hi = aug.noise.snr_db
        snr = lo + (hi - lo) * torch.rand(n, generator=gen)
        # noise power set to the clip's own power / 10^(snr/10): a silent clip stays silent
        k = torch.sqrt(x.pow(2).mean(1) / seg.pow(2).mean(1).clamp_min(1e-12) / 10 ** (snr / 10))
        x = x + (pick * k)[:, None] * seg
    if aug.gain_db != (0.0, 0.0):
        lo, hi = aug.gain_db
        x = x * 10 ** ((lo + (hi - lo) * torch.rand(n, 1, generator=gen)) / 20)
    return x.round().clamp(-32768, 32767)


def augment_sensor(x, aug, gen, std):
    """Time warp, per-channel scaling and jitter on a float (B, L, C) batch of raw sensor values;
    ``std``: (C,) each channel's std over the training split (jitter is relative to it)."""
    import torch
    import torch.nn.functional as F

    n, length, channels = x.shape
    if aug.time_warp > 0:
        # the local speed: 4 random knots in 1 +- time_warp, linear between, integrated into a
        # monotone map of [0, L-1] onto itself, where each window is then read (linearly)
        speed = 1 + (torch.rand(n, 1, 4, generator=gen) * 2 - 1) * aug.time_warp
        speed = F.interpolate(speed, size=length, mode="linear", align_corners=True)[:, 0]
        pos = torch.cumsum(speed, 1) - speed[:, :1]
        pos = pos / pos[:, -1:] * (length - 1)
        i0 = pos.floor().long().clamp(0, length - 2)
        frac = (pos - i0)[..., None]
        at = lambda i: x.gather(1, i[..., None].expand(-1, -1, channels))  # noqa: E731
        x = at(i0) * (1 - frac) + at(i0 + 1) * frac
    if aug.scale != (1.0, 1.0):
        lo, hi = aug.scale
        x = x * (lo + (hi - lo) * torch.rand(n, 1, channels, generator=gen))
    if aug.jitter > 0:
        x = x + torch.randn(x.shape, generator=gen) * (aug.jitter * std)
    return x


class RawBatches:
    """Training batches made from RAW samples (N, *raw_shape): augmented per the layout, then
    run through the front end's torch module (the graph the board's library computes), so the
    net trains on the features of samples a board could have been fed. Without augmentation the
    batch equals the data stage's stored features (tests/passes/test_augment.py)."""

    def __init__(self, raw: np.ndarray, aug, layout: str, front_end, sample_rate=None, noise=None,
                 noise_starts=None):
        import torch

        self.raw = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
        self.aug, self.layout, self.front_end, self.sample_rate = aug, layout, front_end.eval(), sample_rate
        self.noise = None if noise is None else torch.from_numpy(noise.astype(np.float32))
        self.noise_starts = None if noise_starts is None else torch.from_numpy(np.asarray(noise_starts, np.int64))
        if getattr(aug, "noise", None) is not None and self.noise is None:
            raise PassError("dataset.augment.noise is set but raw_train.npz holds no noise; rerun the data task")
        # sensor jitter is relative to each channel's spread over the training split
        self.std = self.raw.reshape(-1, self.raw.shape[-1]).std(0) if layout == "sequence" else None

    def __len__(self) -> int:
        return len(self.raw)

    def augmented(self, idx, gen):
        """The raw batch ``idx``, augmented (float32 raw values)."""
        x = self.raw[idx]
        if self.layout == "audio":
            return augment_audio(x, self.aug, gen, self.sample_rate, self.noise, self.noise_starts)
        if self.layout == "sequence":
            return augment_sensor(x, self.aug, gen, self.std)
        if self.layout == "image":  # (B, H, W, C) 0..255 -> [0, 1] NCHW -> back, rounded as uint8 is
            out = augment(x.permute(0, 3, 1, 2) / 255, self.aug, gen)
            return (out * 255).round().permute(0, 2, 3, 1).contiguous()
        raise PassError(f"no augmentation of {self.layout} samples")

    def __call__(self, idx, gen):
        import torch

        with torch.no_grad():
            return self.front_end(self.augmented(idx, gen))


def raw_batches(project, data_dir) -> RawBatches | None:
    """The train stage's ``RawBatches`` (None when no augmentation of raw samples is set,
    ``raw_augmented``): the data stage's raw_train.npz, the same rows the task fits on
    (``passes.tasks.fit_split``), and its front end as front_end.json fitted it."""
    ds = project.dataset
    if not raw_augmented(ds):
        return None
    from pydantic import TypeAdapter

    from kiln.schema import FrontEnd
    from passes import frontends

    path = Layout.split_file(data_dir, Layout.RAW_TRAIN)
    info = read_json(Path(data_dir) / Layout.FRONT_END_JSON)
    fe = TypeAdapter(FrontEnd).validate_python(info["settings"])
    module = frontends.module(fe, info["layout"], tuple(info["raw_shape"]), info["stats"], info["sample_rate"])
    x, _ = _tasks.fit_split(project, data_dir, Layout.RAW_TRAIN)
    with np.load(path) as z:
        noise = (z["noise"], z["noise_starts"]) if "noise" in z.files else (None, None)
    return RawBatches(x, ds.augment, info["layout"], module, info["sample_rate"], *noise)


def finetune_options(project, data_dir, y_train) -> dict:
    """What a compression pass's fine-tuning keeps of the train stage's loop (prune, weight
    coding): the task's loss weights (training.class_weights) and the augmented raw batches; the
    schedule is fine-tuning's own (one-cycle over its few epochs, no early stopping)."""
    return {"class_weights": _tasks.of(project).loss_weights(project, y_train), "raw": raw_batches(project, data_dir)}


class Samples:
    """A split as a torch map-style Dataset fetched a batch at a time: ``self[idx]`` (idx: the
    batch's indices) is (idx, x[idx], y[idx]). ``x``/``y`` are any array-like indexed by an index
    array: an in-memory np.ndarray or the data stage's np.memmap (only the batch's rows are
    read). With background workers (fork) the arrays are shared with the workers, not copied."""

    def __init__(self, x, y, load_x: bool = True):
        self.x, self.y, self.load_x = x, y, load_x

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        xb = np.ascontiguousarray(self.x[idx]) if self.load_x else np.zeros(0, np.uint8)
        return idx, xb, np.ascontiguousarray(self.y[idx])


class _Batches:
    """The loader's sampler: each epoch's batches of indices, in the order ``set_order`` gave
    (the loop draws it from its generator, so the batches, and the augmentation drawn in the
    main process, are those of the in-memory loop before it)."""

    def __init__(self, batch: int):
        self.batch, self.order = batch, np.zeros(0, np.int64)

    def set_order(self, order) -> None:
        self.order = np.asarray(order, dtype=np.int64)

    def __iter__(self):
        for i in range(0, len(self.order), self.batch):
            yield self.order[i : i + self.batch]

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch)


def resolve_device(name: str = "auto"):
    """training.device as a torch.device: auto is cuda when torch sees it, else cpu."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PassError(f"training.device: {name!r} asked, but torch sees no CUDA device")
    return torch.device(name)


def loader_workers(setting, device) -> int:
    """training.loader_workers: auto is 0 on cpu (the step and the loading would share the same
    cores: a worker only adds IPC), min(4, cores - 1) when a GPU does the step."""
    import os

    if setting != "auto":
        return int(setting)
    return 0 if device.type == "cpu" else max(1, min(4, (os.cpu_count() or 2) - 1))


class _OnDevice:
    """The model as the tasks' validation sees it: CPU batches in, CPU outputs out, the forward
    on the training device (passes/tasks/ validate on CPU tensors)."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def eval(self):
        self.model.eval()
        return self

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def __call__(self, x):
        return self.model(x.to(self.device)).float().cpu()

    def __getattr__(self, name):  # parameters(), modules(), ... of the model itself
        return getattr(self.model, name)


def fit(model, x, y, *, epochs: int, batch: int, lr: float, aug, gen, xva=None, yva=None,
        after_step=None, keep_best: bool = False, tag: str = "train", loss: str = "classification",
        class_weights: list[float] | None = None, recipe=None, raw=None, device=None,
        workers=None) -> list[dict]:
    """Adam with a one-cycle schedule on uint8 NHWC samples ``x``/``y`` with online augmentation
    ``aug``; batches and augmentation drawn from ``gen``. ``recipe`` (training: its schedule,
    weight_decay and early_stopping; None: one-cycle Adam over every epoch) changes that;
    ``raw`` (a ``RawBatches``) makes each training batch from augmented raw samples instead. ``after_step(model)`` runs after each
    optimizer step (compression passes keep pruning masks applied with it). With ``keep_best``
    the model ends with the weights of its best validation epoch. Returns one row per epoch.

    ``loss``: the net's objective, which names its task (passes/tasks/): "classification"
    (cross-entropy on the labels; rows have ``val_accuracy`` when validation samples are given)
    or "reconstruction" (MSE between the output and the flattened, augmented input:
    autoencoders; labels are not used; rows have ``val_mse``, the best epoch is the lowest). An
    anomaly detector's callers pass its normal samples only (``passes.tasks.fit_split``), for
    training and for validation. ``class_weights``: the loss's per-class weights (the task's
    ``loss_weights``: training.class_weights; None: every class alike).

    Batches stream through a torch DataLoader over ``x``/``y`` (``Samples``: np.ndarray or
    np.memmap alike) with ``workers`` background processes (None: the recipe's
    training.loader_workers, else 0). ``device`` (None: the recipe's training.device, else cpu):
    on CUDA the step runs under autocast (float16) with a GradScaler. Inside a torch.distributed
    process group (passes/support/distributed.py) the model is wrapped in DDP and each rank
    trains on its DistributedSampler share, batch / world_size samples a step (the global batch
    stays ``batch``); every rank validates the whole validation split, so all keep the same
    best epoch. The model ends on the CPU."""
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    if loss not in LOSSES:
        raise ValueError(f"fit: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    device = resolve_device(device or getattr(recipe, "device", "cpu"))
    workers = loader_workers(workers if workers is not None else getattr(recipe, "loader_workers", 0), device)
    ddp = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if ddp else (1, 0)
    step_batch = max(1, math.ceil(batch / world))
    steps_per_epoch = math.ceil(math.ceil(len(y) / world) / step_batch)
    model.to(device)
    net = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt, sched = _optimizer(model, lr, max(1, epochs * steps_per_epoch), recipe)
    stop = getattr(recipe, "early_stopping", None)
    if raw is not None and len(raw) != len(y):
        raise PassError(f"{tag}: {len(raw)} raw training samples for {len(y)} training samples; rerun the data task")
    task = by_objective(loss)
    loss_fn = task.loss_fn(class_weights)
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn = loss_fn.to(device)
    metric, sign = task.VAL_METRIC, task.VAL_SIGN
    amp = device.type == "cuda"  # mixed precision on CUDA only (CPU keeps float32: its numbers as before)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    batches = _Batches(step_batch)
    sampler = DistributedSampler(range(len(y)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=int(torch.initial_seed()) % 2**31) if ddp else None
    loader = DataLoader(Samples(x, y, load_x=raw is None), sampler=batches, batch_size=None, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=amp)
    uint8 = np.dtype(getattr(x, "dtype", np.float32)) == np.uint8
    probe = _OnDevice(model, device) if device.type != "cpu" else model
    best, history, watch = {"score": -math.inf}, [], {"score": -math.inf, "since": 0}
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        net.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
            batches.set_order(list(sampler))
        else:
            batches.set_order(torch.randperm(len(y), generator=gen).numpy())
        total = torch.zeros(2, dtype=torch.float64)
        for idx, xb, yb in loader:
            if raw is not None:  # raw samples augmented, then the front end
                xb = raw(idx, gen)
            else:  # augmentation is for pixels in [0, 1]; a front end's features are left as they are
                xb = to_tensor(xb.numpy())
                xb = augment(xb, aug, gen) if uint8 else xb
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                out = net(xb)
                value = task.loss(loss_fn, out.float(), xb, yb)
            opt.zero_grad()
            if scaler is not None:
                scaler.scale(value).backward()
                scaler.step(opt)
                scaler.update()
            else:
                value.backward()
                opt.step()
            if sched is not None:
                sched.step()
            if after_step is not None:
                after_step(model)
            total += torch.tensor([value.item() * len(idx), len(idx)], dtype=torch.float64)
            if ddp:
                _distributed.fault_hook(rank, epoch)  # tests only: a rank lost mid-epoch
        if ddp:  # the epoch's loss over every rank's samples; rank 0's BatchNorm statistics
            total = total.to(device)  # everywhere (DDP broadcasts them before a forward, not after),
            dist.all_reduce(total)  # so every rank validates the same model and keeps the same
            total = total.cpu()  # best epoch and early stop
            for buf in model.buffers():
                dist.broadcast(buf, 0)
        row = {"epoch": epoch, "loss": float(total[0] / max(1.0, float(total[1])))}
        if xva is not None:
            row[metric] = task.validation(probe, xva, yva)
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        _log_epoch(tag, epochs, row)
        score = sign * row[metric] if metric in row else 0.0
        if keep_best and score > best["score"]:
            best = {"score": score, "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        if stop is not None and metric in row and _stalled(watch, score, stop):
            log.info("%s: early stop after epoch %d: val %s no better for %d epoch(s)", tag, epoch,
                     metric, stop.patience)
            break
    if keep_best and "state_dict" in best:
        model.load_state_dict(best["state_dict"])
    model.to("cpu")
    model.eval()
    return history


def _optimizer(model, lr: float, steps: int, recipe):
    """(optimizer, scheduler stepped per batch or None) for ``recipe`` (training.schedule,
    training.weight_decay): Adam under a one-cycle schedule by default; AdamW with weight decay."""
    import torch

    decay = getattr(recipe, "weight_decay", 0.0)
    params = model.parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=decay) if decay > 0 else torch.optim.Adam(params, lr=lr)
    schedule = getattr(recipe, "schedule", "one_cycle")
    if schedule == "one_cycle":
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    if schedule == "cosine":
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    if schedule == "constant":
        return opt, None
    raise ValueError(f"training.schedule: {schedule!r} is not one of one_cycle, cosine, constant")


def _stalled(watch: dict, score: float, stop) -> bool:
    """Early stopping's count: True once the score (higher is better) has not beaten its best
    by more than ``stop.min_delta`` for ``stop.patience`` epochs."""
    if score > watch["score"] + stop.min_delta:
        watch.update(score=score, since=0)
        return False
    watch["since"] += 1
    return watch["since"] >= stop.patience


def _log_epoch(tag: str, epochs: int, row: dict) -> None:
    """One line per epoch with the metrics it has: fine-tuning without validation images
    (weight coding) has no val accuracy, and a 'val_acc nan' would read like a broken model."""
    fmt, args = "%s: epoch %d/%d loss %.4f", [tag, row["epoch"], epochs, row["loss"]]
    if "val_accuracy" in row:
        fmt += " val_acc %.4f"
        args.append(row["val_accuracy"])
    if "val_mse" in row:
        fmt += " val_mse %.5f"
        args.append(row["val_mse"])
    if "val_mae_std" in row:  # a regressor's: the val MAE in target stds
        fmt += " val_mae %.4f std"
        args.append(row["val_mae_std"])
    log.info(fmt + " (%.1f s)", *args, row["seconds"])
