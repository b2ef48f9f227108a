"""Hand-written PyTorch versions of the specs' nets, written the way a user
would write them, independent of convspec.  Tests copy a built net's weights
in and compare outputs in float64; bench/step_time.py races them.

cuda-convnet rounds conv output sizes up and pads the bottom/right edge with
implicit zeros; where that matters (AlexNet's 11x11 stride-4 conv on 224) the
hand-written net pads explicitly, as a user porting the net would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AlexNetGrouped(nn.Module):
    """Single-device AlexNet with grouped convolutions: the two-tower split of
    Krizhevsky et al. (2012) is, mathematically, groups=2."""

    def __init__(self, num_classes: int = 1000, lrn: bool = False):
        super().__init__()
        self.lrn = lrn
        self.conv1 = nn.Conv2d(3, 96, 11, stride=4)
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)
        self.fc6 = nn.Linear(256 * 6 * 6, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, num_classes)

    def _norm(self, x):
        if not self.lrn:
            return x
        # Per tower: the paper's normalisation never crosses the GPU split.
        a, b = x.chunk(2, dim=1)
        norm = lambda t: F.local_response_norm(t, 5, alpha=1e-4, beta=0.75, k=2.0)
        return torch.cat([norm(a), norm(b)], dim=1)

    def forward(self, x):
        x = F.relu(self.conv1(F.pad(x, (0, 3, 0, 3))))  # 224 -> 55, as cuda-convnet
        x = F.max_pool2d(self._norm(x), 3, 2)
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(self._norm(x), 3, 2)
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = F.relu(self.conv5(x))
        x = F.max_pool2d(x, 3, 2).flatten(1)
        x = F.dropout(F.relu(self.fc6(x)), 0.5, self.training)
        x = F.dropout(F.relu(self.fc7(x)), 0.5, self.training)
        return self.fc8(x)


def alexnet_from_built(net, lrn: bool = False) -> AlexNetGrouped:
    """Copy a built two-tower AlexNet's weights into the grouped module."""
    ref = AlexNetGrouped(lrn=lrn).to(next(net.parameters()).dtype)
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    cat = torch.cat
    with torch.no_grad():
        ref.conv1.weight.copy_(cat([sd["conv1a.weight"], sd["conv1b.weight"]]))
        for n in (2, 4, 5):
            getattr(ref, f"conv{n}").weight.copy_(cat([sd[f"conv{n}a.weight"], sd[f"conv{n}b.weight"]]))
        ref.conv3.weight.copy_(cat([cat([sd[f"conv3{t}.weight.0"], sd[f"conv3{t}.weight.1"]], 1) for t in "ab"]))
        for n in (1, 2, 3, 4, 5):
            getattr(ref, f"conv{n}").bias.copy_(cat([sd[f"conv{n}a.bias"], sd[f"conv{n}b.bias"]]))
        for n in (6, 7):
            fc = getattr(ref, f"fc{n}")
            fc.weight.copy_(cat([cat([sd[f"fc{n}{t}.weight.0"], sd[f"fc{n}{t}.weight.1"]], 1) for t in "ab"]))
            fc.bias.copy_(cat([sd[f"fc{n}a.bias"], sd[f"fc{n}b.bias"]]))
        ref.fc8.weight.copy_(cat([sd["fc8.weight.0"], sd["fc8.weight.1"]], 1))
        ref.fc8.bias.copy_(sd["fc8.bias"])
    return ref


class Cifar80Sec(nn.Module):
    """cuda-convnet's 80-second CIFAR-10 net, by hand.  ``ceil=False``: pools as
    ``nn.MaxPool2d(3, 2)`` is usually written, dropping the edge (32 -> 15 -> 7 -> 3)
    where cuda-convnet covers it (32 -> 16 -> 8 -> 4)."""

    def __init__(self, ceil: bool = True):
        super().__init__()
        self.ceil = ceil
        self.conv1 = nn.Conv2d(3, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 32, 5, padding=2)
        self.conv3 = nn.Conv2d(32, 64, 5, padding=2)
        side = 4 if ceil else 3
        self.fc64 = nn.Linear(64 * side * side, 64)
        self.fc10 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 3, 2, ceil_mode=self.ceil))
        x = F.avg_pool2d(F.relu(self.conv2(x)), 3, 2, ceil_mode=self.ceil)
        x = F.avg_pool2d(F.relu(self.conv3(x)), 3, 2, ceil_mode=self.ceil)
        return self.fc10(F.relu(self.fc64(x.flatten(1))))


def response_norm_reference(x: torch.Tensor, size: int, scale: float, power: float, min_div: float) -> torch.Tensor:
    """cuda-convnet's rnorm by explicit loops over the clipped window (slow; tests only)."""
    n, c, h, w = x.shape
    out = torch.empty_like(x)
    for y in range(h):
        for xx in range(w):
            y0, x0 = max(0, y - size // 2), max(0, xx - size // 2)
            y1, x1 = min(h, y - size // 2 + size), min(w, xx - size // 2 + size)
            s = (x[:, :, y0:y1, x0:x1] ** 2).sum(dim=(2, 3))
            out[:, :, y, xx] = x[:, :, y, xx] * (min_div + scale / size ** 2 * s) ** -power
    return out


class Cifar18Pct(nn.Module):
    """cuda-convnet's 18% CIFAR-10 net, by hand (rnorm written as loops)."""

    def __init__(self, scale=0.00005, power=0.75):
        super().__init__()
        self.scale, self.power = scale, power
        self.conv1 = nn.Conv2d(3, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 32, 5, padding=2)
        self.conv3 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc10 = nn.Linear(64 * 4 * 4, 10)

    def forward(self, x):
        norm = lambda t: response_norm_reference(t, 3, self.scale, self.power, 1.0)
        x = norm(F.relu(F.max_pool2d(self.conv1(x), 3, 2, ceil_mode=True)))
        x = norm(F.avg_pool2d(F.relu(self.conv2(x)), 3, 2, ceil_mode=True))
        x = F.avg_pool2d(F.relu(self.conv3(x)), 3, 2, ceil_mode=True)
        return self.fc10(x.flatten(1))


class Cifar18PctPooled(Cifar18Pct):
    """The same net as a user would write it for speed: the rnorm window sum
    as a zero-padded average pool of the squares (bench/step_time.py's peer)."""

    def forward(self, x):
        def norm(t):
            window = F.avg_pool2d(t * t, 3, 1, 1, count_include_pad=True) * 9  # clipped 3x3 sum
            return t * (1.0 + self.scale / 9 * window) ** -self.power

        x = norm(F.relu(F.max_pool2d(self.conv1(x), 3, 2, ceil_mode=True)))
        x = norm(F.avg_pool2d(F.relu(self.conv2(x)), 3, 2, ceil_mode=True))
        x = F.avg_pool2d(F.relu(self.conv3(x)), 3, 2, ceil_mode=True)
        return self.fc10(x.flatten(1))


class LocallyConnected(nn.Module):
    """An unshared-filter layer as users write one (PyTorch has none): F.unfold's
    columns and an einsum; weight (locations, filters, channels, k, k) as convspec's."""

    def __init__(self, channels: int, filters: int, out_size: int, kernel: int, padding: int):
        super().__init__()
        self.kernel, self.padding, self.out_size = kernel, padding, out_size
        self.weight = nn.Parameter(torch.zeros(out_size * out_size, filters, channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(filters, out_size, out_size))

    def forward(self, x):
        cols = F.unfold(x, self.kernel, padding=self.padding)  # (N, C*k*k, L)
        w = self.weight.flatten(2)  # (L, F, C*k*k)
        out = torch.einsum("ncl,lfc->nfl", cols, w)
        return out.reshape(x.shape[0], -1, self.out_size, self.out_size) + self.bias


class Cifar11Pct(nn.Module):
    """cuda-convnet's conv + local CIFAR-10 net (layers-conv-local-11pct.cfg) on 24x24
    crops, by hand: cmrnorm is torch's own local_response_norm (the same formula:
    minDiv + scale/size * sum of squares over the channel window, to the -pow)."""

    def __init__(self, scale=0.001, power=0.75):
        super().__init__()
        self.scale, self.power = scale, power
        self.conv1 = nn.Conv2d(3, 64, 5, padding=2)
        self.conv2 = nn.Conv2d(64, 64, 5, padding=2)
        self.local3 = LocallyConnected(64, 64, 6, 3, 1)
        self.local4 = LocallyConnected(64, 32, 6, 3, 1)
        self.fc10 = nn.Linear(32 * 6 * 6, 10)

    def forward(self, x):
        norm = lambda t: F.local_response_norm(t, 9, alpha=self.scale, beta=self.power, k=1.0)
        x = norm(F.max_pool2d(F.relu(self.conv1(x)), 3, 2, ceil_mode=True))
        x = F.max_pool2d(norm(F.relu(self.conv2(x))), 3, 2, ceil_mode=True)
        x = F.relu(self.local4(F.relu(self.local3(x))))
        return self.fc10(x.flatten(1))


def copy_by_name(net, ref: nn.Module) -> nn.Module:
    """Copy weights whose state-dict names match (the CIFAR nets use the spec's names)."""
    ref = ref.to(next(net.parameters()).dtype)
    ref.load_state_dict({k: v for k, v in net.state_dict().items()})
    return ref
