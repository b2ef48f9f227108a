"""Top-1 and top-k error: one function for validation during training and for
``convspec eval``, so the two give the same numbers on the same checkpoint.

With 10 views (the paper's four corners and centre, each flipped), the
softmax outputs of the views are averaged before ranking, as in section 4.1.
Under ``torch.distributed`` every rank scores its own share and the counts
are summed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from convspec.errors import Location, fail

from .distributed import Cluster, all_reduce_sum
from .progress import Progress


@dataclass
class EvalResult:
    top1_error: float  # fractions
    topk_error: float
    k: int
    images: int
    views: int
    per_class_images: np.ndarray = field(repr=False, default=None)  # (classes,)
    per_class_top1_wrong: np.ndarray = field(repr=False, default=None)
    per_class_topk_wrong: np.ndarray = field(repr=False, default=None)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on the device the images go to; fp32 does nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             num_classes: int, k: int = 5, precision: str = "fp32", total: int | None = None,
             progress: bool = False, channels_last: bool = False, cluster: Cluster | None = None) -> EvalResult:
    """``batches``: (B, V, 3, H, W) views and (B,) labels, as ``loader.eval_batches`` gives."""
    was_training = model.training
    model.eval()
    k = min(k, num_classes)
    counts = torch.zeros(3, num_classes, dtype=torch.int64)  # images, top-1 wrong, top-k wrong
    bar = Progress(total or 0, "evaluating", enabled=progress and bool(total))
    # ``total`` counts every rank's images, and each rank scores its share: rank 0's bar stands
    # for all (its share is the largest, so the last update is clamped to the total)
    world = cluster.world if cluster is not None else 1
    views = 1
    try:
        for images, labels in batches:
            b, views = images.shape[:2]
            x = images.reshape(b * views, *images.shape[2:]).to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                logits = model(x)
            probs = F.softmax(logits.float(), dim=1).reshape(b, views, -1).mean(1).cpu()
            ranked = probs.topk(k, dim=1).indices
            hit = ranked == labels[:, None]
            counts[0].index_add_(0, labels, torch.ones_like(labels))
            counts[1].index_add_(0, labels, (~hit[:, 0]).long())
            counts[2].index_add_(0, labels, (~hit.any(1)).long())
            bar.update(min(b * world, max(bar.total - bar.done, 0)) if world > 1 else b)
    finally:
        bar.close()
        model.train(was_training)
    if cluster is not None:
        all_reduce_sum(counts, cluster)
    images, wrong1, wrongk = counts.sum(1).tolist()
    return EvalResult(wrong1 / max(images, 1), wrongk / max(images, 1), k, images, views,
                      *(c.numpy() for c in counts))


def evaluation_images(recorded: dict, data: str | None = None, labels: str | None = None,
                      where: str = "checkpoint"):
    """(source, indices, description) of the images a run is scored on: every
    image under ``data``, else the run's validation data or held-out images.
    ``recorded`` is a checkpoint's ``data`` entry.

    Image folders stay on disk: scoring reads each image once, so reading them
    all into memory first would only add work (all 50,000 CIFAR JPEGs to score
    the 5,000 held out) and memory."""
    from pathlib import Path

    import numpy as np

    from .loader import open_source, recorded_held_out, refuse_other_size
    from .runs import data_change, recorded_data_path
    from .sources import fingerprint, resolve

    classes, size = recorded["classes"], recorded["size"]
    if data is not None:
        source = open_source(data, "val", classes=classes, size=size, labels_file=Path(labels) if labels else None,
                             stats=False, in_memory=False)
        refuse_other_size(source, size, data, "the run's images were",
                          f"give a store prepared with --size {size}, or the image folder (eval rescales it)")
        which = f" (its {source.store_split} split)" if source.store_split else ""
        return source, np.arange(len(source)), f"{data}{which}"
    indices = recorded["val_indices"].numpy()
    if recorded["val_path"]:
        source = open_source(recorded["val_path"], "val", classes=classes, size=size, stats=False,
                             in_memory=False, held_out=recorded_held_out(recorded))
        return source, indices, f"{recorded['val_path']} (the run's validation data)"
    if len(indices) == 0:
        raise fail("the run held out no validation images (valFraction=0); give --data PATH to evaluate on",
                   Location(where))
    path = recorded_data_path(recorded, "put it back to score the held-out images (--data PATH scores every "
                                        "image under PATH instead)")
    # The held-out images are positions in the listing: after a file is added or removed they are other
    # images, some of them trained on (a resume refuses such data the same way).
    change = data_change(recorded, fingerprint(resolve(path).resolve()))
    source = None if change else open_source(path, "train", size=size, stats=False, in_memory=False)
    change = change or data_change(recorded, recorded["fingerprint"], len(source))
    if change:
        raise fail(f"is not the data the run was trained on: {change}; its held-out images cannot be found again: "
                   "put it back as it was, or give --data PATH to score every image under PATH",
                   Location(str(path)))
    return source, indices, f"{path} ({len(indices):,} held-out validation images)"


@dataclass
class CheckpointEval:
    result: EvalResult
    checkpoint: str
    data: str
    class_names: list[str]
    # True when the crop is the whole image (CIFAR's 32x32 crops of 32x32 images): "centre
    # crop" would then mislead, and the 10 views are the image and its mirror, five times each.
    whole_image: bool = False
    notes: list[str] = field(default_factory=list)


def trained_on_note(recorded: dict, data: str | None, source) -> str | None:
    """A note when ``--data`` scored the very images the run trained on: the class folders
    it trained on (or the train/ of its train/ and val/ folders), or the train split of
    its store. CIFAR batches and two-split folders are scored on their other split."""
    from pathlib import Path

    from .download import DATASETS
    from .sources import detect

    if data is None or recorded.get("resolved") is None or (data in DATASETS and not Path(data).exists()):
        return None
    from .sources import fingerprint

    here, trained = Path(data).resolve(), Path(recorded["resolved"])
    kind = detect(here)
    same_folders = kind == "classfolders" and here in (trained, trained / "train")
    same_store = kind == "store" and here == trained and getattr(source, "store_split", None) == "train"
    n = len(recorded["train_indices"])
    if same_folders or same_store:
        then, now = recorded.get("images"), len(source)
        # (The recorded fingerprint is of the folder trained on, which holds DIR/train when that was given.)
        if same_folders and then is not None and (now != then or fingerprint(trained) != recorded.get("fingerprint")):
            # Files came, went or changed since: which are the trained ones is not known, only at most
            # how many, and without --data eval would refuse the changed folder.
            counts = f"{then:,} images then, {now:,} now" if now != then else f"{now:,} images, not all the same files"
            return (f"note: {data} is the data this run trained on, changed since ({counts}): up to "
                    f"{min(n, now):,} of its images are training images, so this is no held-out error (give --data "
                    "images the run never trained on)")
        return (f"note: {data} is the data this run trained on: {n:,} of its images are training images, so this "
                "is no held-out error (leave --data out to score the run's held-out images)")
    # A store prepared from the folders it trained on (store.json names them), scored on its train split.
    if kind == "store" and getattr(source, "store_split", None) == "train":
        made_from = source.split.meta.get("source")  # store.json, as the split read it
        if made_from and {Path(made_from), Path(made_from) / "train"} & {trained, trained / "train"}:
            return (f"note: {data} is a store prepared from the data this run trained on ({recorded['path']}): "
                    f"{n:,} of its images are training images, so this is no held-out error (leave --data out "
                    "to score the run's held-out images)")
    # A copy (cp -r) of the class folders it trained on: the same names and sizes, elsewhere.
    # (Counted first: the fingerprint stats every file, and most folders differ in count already.)
    if kind == "classfolders" and len(source) == recorded.get("images") and \
            fingerprint(here) == recorded.get("fingerprint"):
        return (f"note: {data} holds the same files as the data this run trained on ({recorded['path']}): "
                f"{n:,} of its images are training images, so this is no held-out error (leave --data out to "
                "score the run's held-out images)")
    return None


def evaluate_checkpoint(checkpoint: str | None = None, data: str | None = None, labels: str | None = None,
                        k: int = 5, views: int | None = None, devices: list[str] | None = None,
                        batch_size: int | None = None, runs_root: str = "runs",
                        progress: bool = False) -> CheckpointEval:
    """``convspec eval``: the run's own validation images by default, or every
    image under ``data`` with its classes mapped through the run's class list."""
    from pathlib import Path

    from . import checkpoint as ckpt
    from . import runs
    from .loader import eval_batches
    from .sources import unread_notes

    path = runs.eval_checkpoint(checkpoint, Path(runs_root))
    state = ckpt.load_training(path)
    recorded = state["data"]
    device_list = devices or (["cuda:0"] if torch.cuda.is_available() else ["cpu"])
    net = runs.net_from_checkpoint(state, device_list, str(path))
    mean = recorded["mean"].numpy()
    source, indices, shown = evaluation_images(recorded, data, labels, where=str(path))
    views = views or state["recipe"]["test_views"]
    batch = batch_size or recorded.get("eval_batch", 128)
    batches = eval_batches(source, indices, batch, recorded["crop"], ten_views=views == 10, mean=mean)
    options = state["options"]
    if options["channels_last"]:
        net = net.to_channels_last()
    result = evaluate(net, batches, torch.device(device_list[0]), len(recorded["classes"]), k,
                      options["precision"], total=len(indices), progress=progress,
                      channels_last=options["channels_last"])
    # Images under --data that are not scored are said, as training says them; the run's own
    # validation data was noted when it trained.
    notes = unread_notes(source, "scored") if data is not None else []
    note = trained_on_note(recorded, data, source)
    return CheckpointEval(result, str(path), shown, list(recorded["class_names"]),
                          whole_image=int(recorded["crop"]) == int(recorded["size"]),
                          notes=notes + ([note] if note else []))
