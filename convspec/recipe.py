"""The ``[train]`` section of the params file: convspec's one extension there,
the training recipe that travels with the spec, so that
``convspec train SPEC --data PATH`` alone reproduces a published result.

    [train]
    epochs=10          # passes over the training split
    batchSize=128      # the global minibatch (split across data-parallel ranks)
    lrDrops=8          # multiply every learning rate by lrFactor after these epochs
    lrFactor=0.1
    plateau=0          # >0: also drop when validation error has not improved for this many epochs
    valFraction=0.1    # share of the training split held out for validation
    splitSeed=0        # which images are held out (independent of --seed)
    seed=0             # initialisation, data order and augmentation
    crop=24            # side of the training crops (default: the data layer's inputSize)
    imageSize=32       # side of the image the crops come from, for image folders
    randomCrop=1       # random crops while training, centre crops for testing
    flip=1             # random horizontal flips
    pcaNoise=0.1       # std of the paper's PCA colour noise (0: off)
    testViews=10       # 1: centre crop; 10: corners and centre, each flipped
    precision=bf16     # fp32 (default) or bf16: the layers under autocast; --precision overrides

Checked like every other key: typed, with located errors and a suggestion for
a typo.  Command-line options override these (``convspec train --epochs``,
``--set train.KEY=VALUE``).  No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from . import values as V
from .errors import did_you_mean, fail
from .parse import Section, Word


@dataclass(frozen=True)
class Recipe:
    epochs: int = 10
    batch_size: int = 128
    lr_drops: tuple[int, ...] = ()
    lr_factor: float = 0.1
    plateau: int = 0
    val_fraction: float = 0.1
    split_seed: int = 0
    seed: int = 0
    crop: int | None = None  # None: the data layer's size
    image_size: int | None = None  # None: crop * 256/224 with randomCrop (224 -> 256, the paper), else the crop
    flip: bool = False
    random_crop: bool = False
    pca_noise: float = 0.0
    test_views: int = 1
    precision: str = "fp32"

    def with_options(self, **options) -> "Recipe":
        """The recipe with command-line options that were given (not None)."""
        return replace(self, **{k: v for k, v in options.items() if v is not None})

    def as_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


DataRecipe = Recipe  # the data keys came first (issue 3); the name stays for readers of old code


MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer


def _fraction(item, ctx):
    value = V.to_float(item, ctx, minimum=0.0)
    if value >= 1.0:
        raise fail(f"{ctx.where()}={item.text} must be below 1 (a share of the training split)", item.loc)
    return value


def _drop_factor(item, ctx):  # 0 would stop learning at the first drop; above 1 is not a drop
    return V.to_share(item, ctx, "each drop multiplies the learning rates by it")


def _views(item, ctx):
    value = V.to_int(item, ctx)
    if value not in (1, 10):
        raise fail(f"[train]: testViews must be 1 (centre crop) or 10 (the paper's 10 views), not {value}",
                   item.loc)
    return value


PRECISIONS = ("fp32", "bf16")


def _precision(item, ctx):
    return V.to_word(item, ctx, PRECISIONS)


def _positive_int(item, ctx):
    return V.to_int(item, ctx, minimum=1)


def _pca_noise(item, ctx) -> float:
    value = V.to_float(item, ctx, minimum=0.0)
    if value > MAX_PCA_NOISE:  # 1e30 trained on: the colours overflowed float32, and the loss went NaN
        raise fail(f"{ctx.where()}={item.text} is the colour noise's standard deviation, in units of each "
                   f"principal component's (the paper's is 0.1); above {MAX_PCA_NOISE:g} it would bury the image: "
                   f"use 0 to {MAX_PCA_NOISE:g}", item.loc)
    return value


MAX_PCA_NOISE = 10.0
# Images are rescaled to imageSize whole, in memory: 100000 asked for 224 GiB, and the error
# blamed the batch size. ImageNet's largest originals are about 2,400 px.
MAX_IMAGE_SIZE = 4096

# key -> (attribute, converter of one item, takes a list)
_KEYS = {
    "epochs": ("epochs", _positive_int, False),
    "batchSize": ("batch_size", _positive_int, False),
    "lrDrops": ("lr_drops", _positive_int, True),
    "lrFactor": ("lr_factor", _drop_factor, False),
    "plateau": ("plateau", lambda item, ctx: V.to_int(item, ctx, minimum=0), False),
    "valFraction": ("val_fraction", _fraction, False),
    "splitSeed": ("split_seed", lambda item, ctx: V.to_int(item, ctx, minimum=0, maximum=MAX_SEED), False),
    "seed": ("seed", lambda item, ctx: V.to_int(item, ctx, minimum=0, maximum=MAX_SEED), False),
    "crop": ("crop", _positive_int, False),
    "imageSize": ("image_size", lambda item, ctx: V.to_int(item, ctx, minimum=1, maximum=MAX_IMAGE_SIZE), False),
    "flip": ("flip", V.to_bool, False),
    "randomCrop": ("random_crop", V.to_bool, False),
    "pcaNoise": ("pca_noise", _pca_noise, False),
    "testViews": ("test_views", _views, False),
    "precision": ("precision", _precision, False),
}
KEYS = tuple(_KEYS)


def parse_train(section: Section | None) -> Recipe:
    if section is None:
        return Recipe()
    values = {}
    canonical = {k.lower(): k for k in _KEYS}
    seen: dict[str, int] = {}
    for entry in section.entries:
        key = canonical.get(entry.key.lower())
        if key is None:
            hint = did_you_mean(entry.key, _KEYS) or f"; [train] takes {', '.join(_KEYS)}"
            raise fail(f"[train]: unknown key '{entry.key}'{hint}", entry.loc)
        if key in seen:
            raise fail(f"[train]: {key} is set twice (first at line {seen[key]}); keep one", entry.loc)
        seen[key] = entry.loc.line
        attr, convert, is_list = _KEYS[key]
        items = entry.value.items
        if not is_list and len(items) != 1:
            raise fail(f"[train]: {key} takes one value", entry.value.loc)
        if is_list and len(items) == 1 and isinstance(items[0], Word) and items[0].text.lower() == "none":
            values[attr] = ()  # lrDrops=none: an ablation clears the spec's drops with --set
            continue
        converted = [convert(item, V.Ctx("[train]", key)) for item in items]
        if is_list:
            if converted != sorted(set(converted)):
                raise fail(f"[train]: {key} must list increasing epochs, e.g. {key}=120,130", entry.value.loc)
            values[attr] = tuple(converted)
        else:
            values[attr] = converted[0]
    return Recipe(**values)
