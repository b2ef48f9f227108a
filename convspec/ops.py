"""PyTorch modules for each layer type, with cuda-convnet2's run-time semantics.

Each module is built from a checked :class:`~convspec.layers.Layer` and its
``forward`` takes the list of its input tensors.  The formulas, and the
cuda-convnet2 sources they come from, are noted where they differ from the
obvious PyTorch call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Layer
from .values import Neuron

# --- neuron functions (cudaconvnet/include/neuron.cuh) ---------------------------


def apply_neuron(neuron: Neuron | None, x: torch.Tensor) -> torch.Tensor:
    if neuron is None or neuron.name == "ident":
        return x
    name, p = neuron.name, neuron.params
    if name == "relu":
        return F.relu(x)
    if name == "logistic":
        return torch.sigmoid(x)
    if name == "abs":
        # cuda-convnet's gradient is the input's sign with -1 at 0 (unitInput > 0 ? 1 : -1); torch's abs gives 0.
        return torch.where(x > 0, x, -x)
    if name == "softrelu":
        # cuda-convnet returns x itself above 4, not log(1 + e^x).
        return F.softplus(x, beta=1.0, threshold=4.0)
    if name == "square":
        return x * x
    if name == "sqrt":
        return x.sqrt()
    if name == "log":
        return torch.log(p[0] + x)
    if name == "tanh":
        return p[0] * torch.tanh(p[1] * x)
    if name == "abstanh":
        return p[0] * torch.tanh(p[1] * x).abs()
    if name == "brelu":
        # clamp's gradient is 1 at 0 and at a too; cuda-convnet's is (act > 0) * (act < a): 0 at both ends.
        return torch.where(x <= 0, 0.0, torch.where(x >= p[0], p[0], x))
    if name == "linear":
        return p[0] * x + p[1]
    if name == "drelu":
        return x - p[0] * torch.tanh(x / p[0])
    raise AssertionError(name)


def as_images(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """cuda-convnet re-reads flat outputs as images; do the same.  A 4-d input
    is used as it is (a fused step may hand over several towers' channels)."""
    if x.dim() == 4:
        return x
    return x.reshape(x.shape[0], *shape)


def bottom_right_overhang(size: int, out: int, filter_size: int, stride: int, padding: int) -> int:
    """Rows past the bottom (or columns past the right) that cuda-convnet's
    rounded-up output size reads; they hold implicit zeros."""
    return max(0, (out - 1) * stride + filter_size - size - 2 * padding)


class LayerModule(nn.Module):
    def __init__(self, layer: Layer):
        super().__init__()
        self.layer_name = layer.name
        self.image_inputs = list(layer.image_inputs)
        self.neuron: Neuron | None = layer.attrs.get("neuron")


# --- weight layers -------------------------------------------------------------------


def _params_per_input(module: nn.Module, tensors: list[torch.Tensor]) -> None:
    """One input: ``weight``.  Several: ``weight.0``, ``weight.1`` (one bank per input)."""
    if len(tensors) == 1:
        module.weight = nn.Parameter(tensors[0])
    else:
        module.weight = nn.ParameterList([nn.Parameter(t) for t in tensors])


class _FilterLayer(LayerModule):
    """Shared by conv and local: per-input filter geometry."""

    def __init__(self, layer: Layer):
        super().__init__(layer)
        self.out_shape = tuple(layer.shape)
        self.geometry = []  # per input: (filterSize, stride, groups, (pad_left, pad_right, pad_top, pad_bottom))
        _, oh, ow = layer.shape
        for i, (c, h, w) in enumerate(layer.image_inputs):
            f, s, p = layer.per_input("filterSize", i), layer.per_input("stride", i), layer.per_input("padding", i)
            pads = (p, p + bottom_right_overhang(w, ow, f, s, p), p, p + bottom_right_overhang(h, oh, f, s, p))
            self.geometry.append((f, s, layer.per_input("groups", i), pads))

    def make_params(self, layer: Layer, locations: tuple[int, ...], bias_shape: tuple[int, ...]) -> None:
        """Gaussian(initW) filter banks, one per input, with ``locations`` leading
        dimensions (none for conv, one per output position for local), and a
        constant initB bias."""
        fmaps = layer.shape[0]
        tensors = []
        for i, (c, _h, _w) in enumerate(layer.image_inputs):
            f, _s, g, _p = self.geometry[i]
            tensors.append(torch.randn(*locations, fmaps, c // g, f, f) * layer.per_input("initW", i))
        _params_per_input(self, tensors)
        self.bias = nn.Parameter(torch.full(bias_shape, float(layer["initB"])))

    def weights(self) -> list[torch.Tensor]:
        return weight_banks(self)


def weight_banks(module: nn.Module) -> list[torch.Tensor]:
    # Tensor, not Parameter: torch.func.functional_call swaps in plain tensors
    return [module.weight] if isinstance(module.weight, torch.Tensor) else list(module.weight)


class Conv(_FilterLayer):
    """Convolution.  Weight per input: (filters*groups, channels/groups, size, size);
    bias: (filters,) shared, or (filters, outH, outW) with sharedBiases=0."""

    def __init__(self, layer: Layer):
        super().__init__(layer)
        fmaps, oh, ow = layer.shape
        self.make_params(layer, (), (fmaps,) if layer["sharedBiases"] else (fmaps, oh, ow))
        self.shared_biases = layer["sharedBiases"]
        # The common case, one input, shared biases and no edge cropping or padding on one
        # side only, is a single conv2d call; forward takes it without the general path's
        # Python, which on a GPU is time the kernels wait for.
        f, s, _g, (pl, pr, pt, pb) = self.geometry[0]
        _c, h, w = layer.image_inputs[0]
        self.single_call = (len(self.geometry) == 1 and self.shared_biases and pl == pr == pt == pb
                      and (h + 2 * pt - f) // s + 1 == oh and (w + 2 * pl - f) // s + 1 == ow)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, i: int, groups: int | None = None,
             bias: torch.Tensor | None = None) -> torch.Tensor:
        """Input ``i``'s convolution; a shared (1-d) bias goes into the conv call
        itself, which saves a pass and keeps autocast's dtype."""
        f, s, g, (pl, pr, pt, pb) = self.geometry[i]
        shared = bias if bias is not None and bias.dim() == 1 else None
        if pl == pr == pt == pb:
            y = F.conv2d(x, weight, shared, s, pl, 1, groups or g)
        else:
            y = F.conv2d(F.pad(x, (pl, pr, pt, pb)), weight, shared, s, 0, 1, groups or g)
        oh, ow = self.out_shape[1:]
        y = y if y.shape[-2:] == (oh, ow) else y[..., :oh, :ow]
        if bias is not None and shared is None:
            y = y + bias.unsqueeze(0).to(y.dtype)  # unshared: one bias per output location
        return y

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if self.single_call:
            _f, s, g, (p, _, _, _) = self.geometry[0]
            x = as_images(inputs[0], self.image_inputs[0])
            return apply_neuron(self.neuron, F.conv2d(x, self.weight, self.bias, s, p, 1, g))
        y = None
        weights = self.weights()
        for i, (x, w) in enumerate(zip(inputs, weights)):
            # The bias rides on the last input's conv.
            part = self.conv(as_images(x, self.image_inputs[i]), w, i, bias=self.bias if i == len(weights) - 1 else None)
            y = part if y is None else y + part
        return apply_neuron(self.neuron, y)


class Local(_FilterLayer):
    """Locally connected (unshared) filters.  Weight per input:
    (outH*outW, filters*groups, channels/groups, size, size); bias: (filters, outH, outW)."""

    def __init__(self, layer: Layer):
        super().__init__(layer)
        fmaps, oh, ow = layer.shape
        self.make_params(layer, (oh * ow,), (fmaps, oh, ow))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        fmaps, oh, ow = self.out_shape
        y = None
        for i, (x, w) in enumerate(zip(inputs, self.weights())):
            f, s, g, pads = self.geometry[i]
            x = F.pad(as_images(x, self.image_inputs[i]), pads)
            n, locations = x.shape[0], oh * ow
            # Each output location has its own filters: one batched matmul over (location, group) of
            # (images x channels*f*f) @ (channels*f*f x filters).  Patches come as strided views of x
            # in the weight's channel-major order, so the one copy is straight into the bmm's layout
            # (an einsum over F.unfold's columns permuted twice as much, and ran 1.3-2x slower).
            patches = x.unfold(2, f, s).unfold(3, f, s)[:, :, :oh, :ow]  # (N, C, oh, ow, f, f)
            cols = patches.permute(2, 3, 0, 1, 4, 5).reshape(locations, n, g, -1)
            cols = cols.transpose(1, 2).reshape(locations * g, n, -1)
            part = torch.bmm(cols, w.reshape(locations * g, fmaps // g, -1).transpose(1, 2))
            # (location, group, N, filters/group) -> NHWC memory, returned as an (N, F, oh, ow) view
            part = part.view(locations, g, n, -1).permute(2, 0, 1, 3).contiguous().view(n, oh, ow, fmaps)
            part = part.permute(0, 3, 1, 2)
            y = part if y is None else y + part
        return apply_neuron(self.neuron, y + self.bias.unsqueeze(0).to(y.dtype))


class FullyConnected(LayerModule):
    """Weight per input: (outputs, input size), as nn.Linear; bias: (outputs,)."""

    def __init__(self, layer: Layer):
        super().__init__(layer)
        out = layer["outputs"]
        tensors = [torch.randn(out, math.prod(s)) * layer.per_input("initW", i)
                   for i, s in enumerate(layer.input_shapes)]
        _params_per_input(self, tensors)
        self.bias = nn.Parameter(torch.full((out,), float(layer["initB"])))

    def weights(self) -> list[torch.Tensor]:
        return weight_banks(self)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        y = None
        for x, w in zip(inputs, self.weights()):
            if x.dim() != 2:  # a 2-d input is already flat: no reshape call
                x = x.reshape(x.shape[0], -1)
            y = F.linear(x, w, self.bias) if y is None else torch.addmm(y, x, w.t())
        return apply_neuron(self.neuron, y)


# --- pooling ----------------------------------------------------------------------------


class Pool(LayerModule):
    """max, avg and maxabs pooling over [start + o*stride, ... + sizeX), clipped
    to the image; avg divides by the clipped count (cuda-convnet's AvgPooler)."""

    def __init__(self, layer: Layer):
        super().__init__(layer)
        self.kind = layer["pool"]
        self.size, self.stride, self.start = layer["sizeX"], layer["stride"], layer["start"]
        c, h, w = layer.image_inputs[0]
        _, oh, ow = layer.shape
        self.out_hw = (oh, ow)
        natural = [1 + math.ceil((n - self.size) / self.stride) for n in (h, w)]
        # PyTorch's ceil_mode gives the same windows and clipped averages when
        # the windows start at 0 and each starts inside the image.
        self.fast = (self.start == 0 and [oh, ow] == natural and self.stride <= self.size)
        # Otherwise: crop or pad so that the windows tile exactly.
        self.pads = []
        for n, o in ((w, ow), (h, oh)):
            before = -self.start
            after = self.start + (o - 1) * self.stride + self.size - n
            self.pads += [before, after]

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = as_images(inputs[0], self.image_inputs[0])
        k, s = self.size, self.stride
        if self.fast and self.kind == "max":
            y = F.max_pool2d(x, k, s, ceil_mode=True)
        elif self.fast and self.kind == "avg":
            y = F.avg_pool2d(x, k, s, ceil_mode=True, count_include_pad=False)
        else:
            y = self._general(x)
        return apply_neuron(self.neuron, y)

    def _general(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.size, self.stride
        if self.kind == "avg":
            ones = torch.ones_like(x[:1, :1])
            sums = F.avg_pool2d(F.pad(x, self.pads), k, s, divisor_override=1)
            counts = F.avg_pool2d(F.pad(ones, self.pads), k, s, divisor_override=1)
            return sums / counts
        fill = -math.inf if self.kind == "max" else 0.0
        padded = F.pad(x, self.pads, value=fill)
        if self.kind == "max":
            return F.max_pool2d(padded, k, s)
        # maxabs: the element of largest magnitude, with its sign; of two as large (-2 and 2), the later
        # in the window, as cuda-convnet's MaxAbsPooler keeps (a strict ">" over a row-major scan).
        # max_pool2d's indices give the first: flipped, the later comes first, and since the windows
        # tile the padded image exactly, flipping maps them onto each other.
        flipped = padded.flip(2, 3)
        _, idx = F.max_pool2d(flipped.abs(), k, s, return_indices=True)
        return flipped.flatten(2).gather(2, idx.flatten(2)).view_as(idx).flip(2, 3)


# --- normalisation (cudaconv3/src/conv_util.cu) ---------------------------------------------


def _neg_power(denom: torch.Tensor, power: float) -> torch.Tensor:
    """denom ** -power as exp(-power * log(denom)) on a CPU: torch's pow with a fractional
    exponent is not vectorised there (11 ms against 6 for this, on 1.2 M floats), nor is its
    backward.  On a GPU pow is one kernel where this is three."""
    if denom.is_cuda:
        return denom.pow(-power)
    return torch.exp(torch.log(denom) * -power)


class _Norm(LayerModule):
    def __init__(self, layer: Layer):
        super().__init__(layer)
        if layer["scale"] is None or layer["pow"] is None:
            from .errors import fail

            raise fail(f"layer '{layer.name}': {layer.type} needs scale= and pow= "
                       "(in the params file) before it can be built", layer.loc)
        self.size = layer["size"]
        self.scale, self.pow, self.min_div = layer["scale"], layer["pow"], layer["minDiv"]
        self.blocked = layer["blocked"]

    def window_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over a size x size window starting size/2 before each pixel,
        clipped to the image (zeros outside)."""
        before, after = self.size // 2, self.size - 1 - self.size // 2
        if before == after:  # odd sizes: the pool pads itself, saving a padded copy of x
            return F.avg_pool2d(x, self.size, 1, before, count_include_pad=True) * (self.size * self.size)
        padded = F.pad(x, (before, after, before, after))
        return F.avg_pool2d(padded, self.size, 1, divisor_override=1)


class CrossMapNorm(_Norm):
    """out = a * (minDiv + scale/size * sum of a^2 over channels [c - size/2, c - size/2 + size))^-pow;
    ``blocked=1``: over the block of ``size`` channels that holds c."""

    def __init__(self, layer: Layer):
        super().__init__(layer)
        channels, n = layer.image_inputs[0][0], self.size
        c = torch.arange(channels)
        first = (c // n) * n if self.blocked else c - n // 2
        window = (c[None, :] >= first[:, None]) & (c[None, :] < first[:, None] + n)  # [out channel, in channel]
        # The channel-window sum is a 1x1 convolution with this 0/1 band: a GEMM per pixel, which
        # ran 5x faster than a (size, 1, 1) avg_pool3d over the channel axis (forward + backward,
        # 64x12x12 maps, 1 thread), and exact.  Not saved: it follows from the spec.
        self.register_buffer("window", window.float()[:, :, None, None], persistent=False)

    def forward(self, inputs: list[torch.Tensor], towers: int = 1) -> torch.Tensor:
        """``towers``: x holds that many copies of this layer's channels side by side (fused
        towers, convspec.fuse); each is normalised on its own, as a grouped convolution."""
        x = inputs[0] if towers > 1 else as_images(inputs[0], self.image_inputs[0])
        window = self.window.to(x.dtype)
        sums = F.conv2d(x * x, window.repeat(towers, 1, 1, 1) if towers > 1 else window, groups=towers)
        return apply_neuron(self.neuron, x * _neg_power(self.min_div + (self.scale / self.size) * sums, self.pow))


class ResponseNorm(_Norm):
    """Within a map: out = a * (minDiv + scale/size^2 * sum of a^2 over the window)^-pow."""

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = as_images(inputs[0], self.image_inputs[0])
        denom = self.min_div + (self.scale / self.size ** 2) * self.window_sum(x * x)
        return apply_neuron(self.neuron, x * _neg_power(denom, self.pow))


class ContrastNorm(_Norm):
    """Contrast normalisation: d = a - local mean (mean over the clipped window);
    out = a * (minDiv + scale/size^2 * sum of d^2 over the window)^-pow."""

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = as_images(inputs[0], self.image_inputs[0])
        counts = self.window_sum(torch.ones_like(x[:1, :1]))
        diffs = x - self.window_sum(x) / counts
        denom = self.min_div + (self.scale / self.size ** 2) * self.window_sum(diffs * diffs)
        return apply_neuron(self.neuron, x * _neg_power(denom, self.pow))


# --- everything else ---------------------------------------------------------------------------------


class NeuronLayer(LayerModule):
    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return apply_neuron(self.neuron, inputs[0])


class Softmax(LayerModule):
    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return apply_neuron(self.neuron, F.softmax(inputs[0].reshape(inputs[0].shape[0], -1), dim=1))


class Dropout(LayerModule):
    """dropout: keep with probability ``keep`` and scale by 1/keep while training.
    dropout2: keep without scaling while training; scale by ``keep`` otherwise."""

    def __init__(self, layer: Layer):
        super().__init__(layer)
        self.keep, self.enable, self.kind = layer["keep"], layer["enable"], layer.type

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = inputs[0]
        training = self.training and self.enable
        if self.kind == "dropout":
            y = F.dropout(x, 1.0 - self.keep, training=True) if training else x
        elif training:
            y = x * (torch.rand_like(x) < self.keep).to(x.dtype)
        else:
            y = x * self.keep
        return apply_neuron(self.neuron, y)


class Concat(LayerModule):
    def __init__(self, layer: Layer):
        super().__init__(layer)
        self.images = len(layer.shape) == 3

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if not self.images:
            inputs = [x.reshape(x.shape[0], -1) for x in inputs]
        return apply_neuron(self.neuron, torch.cat(inputs, dim=1))


class EltSum(LayerModule):
    def __init__(self, layer: Layer):
        super().__init__(layer)
        self.coeffs = list(layer["coeffs"])

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        first = inputs[0]
        y = self.coeffs[0] * first
        for c, x in zip(self.coeffs[1:], inputs[1:]):
            y = y + c * x.reshape(first.shape)
        return apply_neuron(self.neuron, y)


class EltMax(LayerModule):
    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        y = inputs[0]
        for x in inputs[1:]:
            y = torch.maximum(y, x.reshape(y.shape))
        return apply_neuron(self.neuron, y)
