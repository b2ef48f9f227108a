"""`convspec check` output: the per-layer table, totals and per-device totals,
as text or as JSON."""

from __future__ import annotations

from .check import CheckedNet
from .errors import plural
from .layers import fmt_shape


def as_dict(net: CheckedNet) -> dict:
    layers = []
    for layer in net.layers.values():
        layers.append({
            "name": layer.name,
            "type": layer.type,
            "gpu": list(layer.gpu),
            "shape": list(layer.shape),
            "params": layer.params,
            "neurons": layer.neurons,
            "macs": layer.macs,
            "settings": settings(layer),
        })
    return {
        "spec": net.path,
        "params_file": net.params_path,
        "layers": layers,
        "total_params": net.total_params,
        "total_neurons": net.total_neurons,
        "total_macs": net.total_macs,
        "devices": {
            str(gpu): {"layers": t.layers, "params": t.params, "activation_bytes_per_image": t.activation_bytes}
            for gpu, t in net.devices.items()
        },
        "notes": list(net.notes),
    }


def table(rows: list[tuple[str, ...]], numeric: set[int]) -> list[str]:
    """Aligned text columns: a header row, body rows, and a last (totals) row
    under a rule; ``numeric`` columns are right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        if n == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def settings(layer) -> str:
    """The values most ablations edit, in one cell: kernel/stride and padding, pooling, norm and
    dropout settings, the neuron, and a weight layer's rate, momentum and decay.  Without them the table
    of an edited copy (or a --set) read the same as the baseline's."""
    a = layer.attrs
    parts = []
    if "filterSize" in a:
        parts.append(_per_input(f"{f}x{f}/{s} pad {p}" + (f" groups {g}" if g > 1 else "")
                                for f, s, p, g in zip(a["filterSize"], a["stride"], a["padding"], a["groups"])))
    if "pool" in a:
        parts.append(f"{a['pool']} {a['sizeX']}/{a['stride']}" + (f" start {a['start']}" if a.get("start") else ""))
    if layer.type in ("cmrnorm", "rnorm", "cnorm"):
        parts.append(f"size {a['size']}" + "".join(f" {key} {a[key]:g}" for key in ("scale", "pow")
                                                    if a.get(key) is not None))
    if "keep" in a:
        parts.append(f"keep {a['keep']:g}" if a.get("enable", True) else "off")
    if a.get("neuron") is not None:
        parts.append(str(a["neuron"]))
    if "epsW" in a and a["epsW"] and None not in a["epsW"]:
        parts.append(f"epsW {_per_input(map(str, a['epsW']))}")
        if a["momW"] and None not in a["momW"]:
            parts.append(f"momW {_per_input(f'{m:g}' for m in a['momW'])}")
        parts.append(f"wc {_per_input(f'{w:g}' for w in a['wc'])}")
    return " ".join(parts)


def _per_input(values) -> str:
    """One value for a layer's inputs when they share it (AlexNet's conv3 reads both towers alike)."""
    values = list(values)
    return values[0] if len(set(values)) == 1 else ",".join(values)


def as_text(net: CheckedNet) -> str:
    header = ("layer", "type", "gpu", "output", "params", "neurons", "MACs", "settings")
    rows = [header]
    for layer in net.layers.values():
        gpu = ",".join(map(str, layer.gpu)) if layer.gpu else "-"
        shape = "cost" if layer.type.startswith("cost.") else fmt_shape(layer.shape)
        rows.append((layer.name, layer.type, gpu, shape, f"{layer.params:,}", f"{layer.neurons:,}",
                     f"{layer.macs:,}", settings(layer)))
    rows.append(("total", "", "", "", f"{net.total_params:,}", f"{net.total_neurons:,}", f"{net.total_macs:,}",
                 ""))
    lines = table(rows, numeric={4, 5, 6})
    lines.append("")
    sources = net.path + (f" + {net.params_path}" if net.params_path else " (no params file)")
    lines.append(f"{sources}: {plural(len(net.layers), 'layer')}, {net.total_params:,} parameters, "
                 f"{net.total_neurons:,} neurons, {net.total_macs:,} multiply-adds per image")
    for gpu, t in net.devices.items():
        lines.append(f"  gpu {gpu}: {plural(t.layers, 'layer')}, {t.params:,} parameters, "
                     f"{_mib(t.activation_bytes)} of float32 activations per image")
    for note in net.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
