"""The ``[train]`` section of the params file: convspec's one extension there,
the training recipe that travels with the spec.

    [train]
    crop=24            # side of the training crops (default: the data layer's inputSize)
    randomCrop=1       # random crops while training, centre crops for testing
    flip=1             # random horizontal flips
    pcaNoise=0.1       # std of the paper's PCA colour noise (0: off)
    testViews=10       # 1: centre crop; 10: corners and centre, each flipped

These are the data keys; the training issue adds epochs, batch size and
learning-rate drops.  Checked like every other key: typed, with located
errors and a suggestion for a typo.  No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import values as V
from .errors import did_you_mean, fail
from .parse import Section


@dataclass(frozen=True)
class DataRecipe:
    crop: int | None = None  # None: the data layer's size
    flip: bool = False
    random_crop: bool = False
    pca_noise: float = 0.0
    test_views: int = 1


# key -> (attribute, converter)
_KEYS = {
    "crop": ("crop", lambda item, ctx: V.to_int(item, ctx, minimum=1)),
    "flip": ("flip", V.to_bool),
    "randomCrop": ("random_crop", V.to_bool),
    "pcaNoise": ("pca_noise", lambda item, ctx: V.to_float(item, ctx, minimum=0.0)),
    "testViews": ("test_views", lambda item, ctx: V.to_int(item, ctx)),
}


def parse_train(section: Section | None) -> DataRecipe:
    if section is None:
        return DataRecipe()
    values = {}
    canonical = {k.lower(): k for k in _KEYS}
    for entry in section.entries:
        key = canonical.get(entry.key.lower())
        if key is None:
            hint = did_you_mean(entry.key, _KEYS) or f"; [train] takes {', '.join(_KEYS)}"
            raise fail(f"[train]: unknown key '{entry.key}'{hint}", entry.loc)
        items = entry.value.items
        if len(items) != 1:
            raise fail(f"[train]: {key} takes one value", entry.value.loc)
        attr, convert = _KEYS[key]
        values[attr] = convert(items[0], V.Ctx("[train]", key))
        if key == "testViews" and values[attr] not in (1, 10):
            raise fail(f"[train]: testViews must be 1 (centre crop) or 10 (the paper's 10 views), "
                       f"not {values[attr]}", items[0].loc)
    return DataRecipe(**values)
