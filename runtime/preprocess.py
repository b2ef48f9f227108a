"""The AlexNet paper's preprocessing and augmentation (section 2 and 4.1).

- :func:`load_square`: decode any image, make it RGB (grayscale and CMYK too),
  rescale so the shorter side is ``size`` and crop the central ``size`` x ``size``.
- :class:`Stats`: the training set's per-pixel mean image and the eigenvectors
  and eigenvalues of its RGB covariance, accumulated shard by shard.
- :func:`augment_batch`: random crops, horizontal flips, mean subtraction and
  PCA colour noise on a whole uint8 batch at once.
- :func:`eval_views`: the centre crop, or the paper's 10 views.

Pixels stay in 0..255 (minus the mean), as cuda-convnet and the paper trained.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error we report, not grey pixels


def load_square(data: bytes | str, size: int) -> np.ndarray:
    """(size, size, 3) uint8: short side rescaled to ``size``, centre crop."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        img.draft("RGB", (size, size))  # JPEG: let libjpeg decode at a smaller scale when it can
        return square(img, size)


def square(img: Image.Image, size: int) -> np.ndarray:
    """An open image as RGB, short side rescaled to ``size``, centre crop."""
    if img.mode.startswith("I"):
        # 16-bit grayscale (PNG): Pillow's convert("RGB") clips every value above 255 to white.
        wide = np.asarray(img, dtype=np.float64)
        sixteen = img.mode.startswith("I;16") or wide.max(initial=0) > 255
        img = Image.fromarray(np.clip(np.round(wide / 257 if sixteen else wide), 0, 255).astype(np.uint8), "L")
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


@dataclass
class Stats:
    """Streaming sums for the mean image and the RGB covariance."""

    count: int
    pixel_sum: np.ndarray  # (S, S, 3) float64
    rgb_sum: np.ndarray  # (3,)
    rgb_outer: np.ndarray  # (3, 3)
    rgb_count: int

    @classmethod
    def empty(cls, size: int) -> "Stats":
        return cls(0, np.zeros((size, size, 3)), np.zeros(3), np.zeros((3, 3)), 0)

    def add(self, images: np.ndarray) -> None:
        images = images.astype(np.float64)
        self.count += len(images)
        self.pixel_sum += images.sum(0)
        flat = images.reshape(-1, 3)
        self.rgb_sum += flat.sum(0)
        self.rgb_outer += flat.T @ flat
        self.rgb_count += len(flat)

    def merge(self, other: "Stats") -> None:
        self.count += other.count
        self.pixel_sum += other.pixel_sum
        self.rgb_sum += other.rgb_sum
        self.rgb_outer += other.rgb_outer
        self.rgb_count += other.rgb_count

    def mean_image(self) -> np.ndarray:
        return (self.pixel_sum / max(self.count, 1)).astype(np.float32)

    def pca(self) -> tuple[np.ndarray, np.ndarray]:
        """(eigenvalues (3,), eigenvectors (3, 3) as columns), largest first."""
        n = max(self.rgb_count, 1)
        mean = self.rgb_sum / n
        cov = self.rgb_outer / n - np.outer(mean, mean)
        values, vectors = np.linalg.eigh(cov)
        order = np.argsort(values)[::-1]
        return values[order].astype(np.float32), vectors[:, order].astype(np.float32)

    def to_arrays(self) -> dict:
        return {"count": np.array(self.count), "pixel_sum": self.pixel_sum, "rgb_sum": self.rgb_sum,
                "rgb_outer": self.rgb_outer, "rgb_count": np.array(self.rgb_count)}

    @classmethod
    def from_arrays(cls, a) -> "Stats":
        return cls(int(a["count"]), a["pixel_sum"], a["rgb_sum"], a["rgb_outer"], int(a["rgb_count"]))


@dataclass
class Augment:
    crop: int  # output side
    flip: bool = False
    random_crop: bool = False
    pca_std: float = 0.0  # the paper's 0.1; 0 turns colour noise off


# Crops with at least this many pixels flip through torch: torch.flip moves
# pixels several times faster than numpy's reversed copy of 3-byte pixels, but
# each torch call costs some microseconds more, which small crops (CIFAR) lose.
_TORCH_FLIP_PIXELS = 96 * 96


def augment_batch(images: np.ndarray, mean: np.ndarray, aug: Augment, rng: np.random.Generator,
                  eigvals: np.ndarray | None = None, eigvecs: np.ndarray | None = None,
                  mean_flipped: np.ndarray | None = None, out: np.ndarray | None = None,
                  share: tuple[int, int, int] | None = None) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float32 (B, 3, crop, crop), mean subtracted.

    ``share`` = (rank, world, G): ``images`` are rank's share, ``[rank::world]``,
    of a global batch of G; the crops, flips and colour shifts are drawn for all G
    and this share's taken, so a data-parallel run augments each image as one
    process would, whatever the number of ranks.

    The mean image is cropped at the same place as each image, so the result is
    exactly ``crop(image - mean)``: every pixel is float32(uint8) - float32 mean
    (plus the image's colour shift), whichever path below computes it.  Each
    image is finished while it is still in cache.
    """
    b, s = images.shape[0], images.shape[1]
    c = aug.crop
    rank, world, n = share or (0, 1, b)
    mine = slice(rank, None, world)
    if len(range(n)[mine]) != b:
        raise ValueError(f"share {share}: {b} images are not rank {rank}'s share of {n}")
    if aug.random_crop:
        ys = rng.integers(0, s - c + 1, size=n)[mine]
        xs = rng.integers(0, s - c + 1, size=n)[mine]
    else:
        ys = xs = np.full(b, (s - c) // 2)
    flips = (rng.random(n) < 0.5)[mine] if aug.flip else np.zeros(b, dtype=bool)
    shifts = None
    if aug.pca_std > 0 and eigvals is not None:
        alphas = rng.normal(0.0, aug.pca_std, size=(n, 3)).astype(np.float32)[mine]
        # The paper adds sum_i alpha_i lambda_i p_i.  Eigenvalues scale with the
        # square of the pixel unit, so apply it in [0, 1] units (as common
        # reimplementations do) and convert back: lambda / 255 in 0..255 units.
        # Tiled to a whole row of pixels so that the addition runs along rows
        # rather than in numpy's slow steps of three.  Drawn before the loop but
        # after the crops and flips, as before, so a seed gives the same batch.
        shifts = np.tile((alphas * eigvals / 255.0) @ eigvecs.T, (1, c))
    if out is None or out.shape != (b, c, c, 3) or not out.flags.c_contiguous:
        out = np.empty((b, c, c, 3), dtype=np.float32)
    images = np.ascontiguousarray(images)
    by_torch = c * c >= _TORCH_FLIP_PIXELS
    if flips.any():
        # Reading pixels backwards is numpy's slow path, so flip the mean once
        # (its crops are then plain slices).
        if mean_flipped is None:
            mean_flipped = np.ascontiguousarray(mean[:, ::-1])
        if by_torch:
            with warnings.catch_warnings():
                # A memory-mapped batch is read-only; torch only reads it.
                warnings.simplefilter("ignore", UserWarning)
                pixels = torch.from_numpy(images)
            flipped_mean, outs = torch.from_numpy(mean_flipped), torch.from_numpy(out)
        else:
            pixels = images.view("V3")[..., 0]  # (B, S, S) of RGB triples, reversed whole
            flipped = np.empty((c, c, 3), dtype=np.uint8)
    for i, (y, x, flip) in enumerate(zip(ys.tolist(), xs.tolist(), flips.tolist())):
        o = out[i]
        if not flip:
            # Cast, then subtract in float32: two same-type passes beat one mixed-type ufunc.
            o[...] = images[i, y:y + c, x:x + c]
            o -= mean[y:y + c, x:x + c]
        elif by_torch:
            # torch's mixed uint8 - float32 subtraction casts and subtracts in one pass.
            torch.sub(pixels[i, y:y + c, x:x + c].flip(1), flipped_mean[y:y + c, s - x - c:s - x],
                      out=outs[i])
        else:
            flipped.view("V3")[..., 0] = pixels[i, y:y + c, x:x + c][:, ::-1]
            o[...] = flipped
            o -= mean_flipped[y:y + c, s - x - c:s - x]
        if shifts is not None:
            rows = o.reshape(c, 3 * c)
            rows += shifts[i]
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def eval_views(images: np.ndarray, mean: np.ndarray, crop: int, ten: bool) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, V, 3, crop, crop): the centre (V=1), or the four
    corners and the centre, each also flipped (V=10), mean subtracted."""
    s = images.shape[1]
    centred = images.astype(np.float32) - mean
    offsets = [((s - crop) // 2, (s - crop) // 2)]
    if ten:
        far = s - crop
        offsets = [(0, 0), (0, far), (far, 0), (far, far)] + offsets
    views = [centred[:, y:y + crop, x:x + crop] for y, x in offsets]
    if ten:
        views += [v[:, :, ::-1] for v in views]
    stacked = np.ascontiguousarray(np.stack(views, axis=1))  # (B, V, c, c, 3)
    return torch.from_numpy(stacked).permute(0, 1, 4, 2, 3)
