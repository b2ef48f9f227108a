"""Stage 2: syntax tree -> checked graph.

``check_paths(spec, params, input_shape)`` runs the passes in order:

1. sections: one per layer, no duplicates, each with a known ``type=``;
2. merge the params file's sections into their layers;
3. keys: canonical spelling, typed values, refused and ignored keys;
4. inputs: every name defined, no cycles, a topological order;
5. shapes, parameter and multiply-add counts, with cuda-convnet's formulas;
6. devices: ``gpu=`` placement and replica rules.

Every failure is a located :class:`~convspec.errors.SpecError`.  No torch here,
so ``convspec check`` is fast and works without a GPU build.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import values as V
from .errors import Location, SpecError, did_you_mean, fail, plural
from .layers import (
    IGNORED_KEYS, LAYER_TYPES, LEGACY_SPELLINGS, REFUSED_KEYS, REQUIRED, UNSUPPORTED_TYPES,
    Key, Layer, LayerType, numel,
)
from .overrides import ORIGIN, apply_overrides, parse_override
from .parse import Entry, Section, SpecFile, parse_file
from .recipe import Recipe, parse_train

TRAIN_SECTION = "train"  # convspec extension in the params file: the training recipe


@dataclass
class DeviceTotals:
    layers: int = 0
    params: int = 0
    activation_bytes: int = 0  # float32 outputs held per image


@dataclass
class CheckedNet:
    path: str
    layers: dict[str, Layer]  # in topological order
    params_path: str | None = None
    spec_text: str = ""
    params_text: str = ""
    train: Section | None = None
    recipe: Recipe = field(default_factory=Recipe)
    notes: list[str] = field(default_factory=list)
    # The notes that can change what trains without failing anything (a params
    # section whose layer is misspelt, a layer nothing reads); train and bench
    # print these, check prints every note.
    cautions: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # --set LAYER.KEY=VALUE, as given
    devices: dict[int, DeviceTotals] = field(default_factory=dict)

    def caution(self, text: str) -> None:
        self.notes.append(text)
        self.cautions.append(text)

    @property
    def costs(self) -> list[Layer]:
        """The cost layers in file order: the first is the one whose error is reported
        (``layers`` is in dependency order, which can put an auxiliary cost first)."""
        return sorted((l for l in self.layers.values() if l.type == "cost.logreg"), key=lambda l: l.loc.line)

    @property
    def cost_logits(self) -> list[str]:
        """Each cost's logits (the input of its softmax), in the order of :attr:`costs`."""
        return [self.layers[c.inputs[1]].inputs[0] for c in self.costs]

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers.values())

    @property
    def total_neurons(self) -> int:
        return sum(layer.neurons for layer in self.layers.values())

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers.values())

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        for layer in self.layers.values():
            if layer.type == "data" and layer["dataIdx"] != 1:
                return layer.shape
        return None

    def consumers(self, name: str) -> list[str]:
        return [l.name for l in self.layers.values() if name in l.inputs]

    def read_layers(self) -> set[str]:
        """The layers some layer reads: one pass, where asking consumers() of each layer is quadratic."""
        return {name for l in self.layers.values() for name in l.inputs}


def find_params_file(spec_path: str | Path) -> Path | None:
    """The params file beside a spec: ``NAME.params.cfg``, or cuda-convnet's
    pairing where ``layers`` becomes ``layer-params`` in the file name."""
    spec = Path(spec_path)
    candidates = [spec.with_name(spec.stem + ".params" + spec.suffix)]
    if "layers" in spec.name:
        candidates.append(spec.with_name(spec.name.replace("layers", "layer-params")))
    return next((c for c in candidates if c.is_file()), None)


def check_paths(spec_path: str | Path, params_path: str | Path | None = None,
                input_shape: tuple[int, int, int] | None = None,
                find_params: bool = True, overrides: Sequence[str] = ()) -> CheckedNet:
    """Parse and check a spec (and its params file, given or found beside it),
    with ``--set LAYER.KEY=VALUE`` overrides applied."""
    spec = parse_file(spec_path)
    if params_path is None and find_params:
        params_path = find_params_file(spec_path)
    params = parse_file(params_path) if params_path is not None else None
    return check(spec, params, input_shape, overrides)


def check(spec: SpecFile, params: SpecFile | None = None,
          input_shape: tuple[int, int, int] | None = None, overrides: Sequence[str] = ()) -> CheckedNet:
    if isinstance(overrides, str):  # one override from Python, not a sequence of its characters
        overrides = [overrides]
    net = CheckedNet(spec.path, {}, params.path if params else None, spec.text,
                     params.text if params else "", overrides=list(overrides))
    spec, params = apply_overrides(spec, params, [parse_override(o) for o in overrides])
    layers = _sections_to_layers(spec, net.notes)
    if params is not None:
        net.train = _merge_params(layers, params, net)
        net.recipe = parse_train(net.train)
    for layer in layers.values():
        _resolve_keys(layer)
    _check_inputs(layers)
    order = _topological_order(layers)
    net.layers = {name: layers[name] for name in order}
    try:
        for layer in net.layers.values():
            _infer(layer, net, input_shape)
    except SpecError as err:
        # A shape carries an override or --input to later layers: the file's line may be fine, the option not.
        if overrides and err.location is not None and err.location.path != ORIGIN:
            err.message += f" (the file as changed by --set {' --set '.join(overrides)})"
        if input_shape is not None:
            err.message += f" (with --input {'x'.join(map(str, input_shape))})"
        raise
    _plan_devices(net)
    unset = [l.name for l in net.layers.values()
             if l.type in ("cmrnorm", "rnorm", "cnorm") and (l["scale"] is None or l["pow"] is None)]
    if unset:
        net.notes.append(f"scale= and pow= not set (they belong in the params file); needed to build: "
                         f"{', '.join(unset)}")
    untrainable = [layer.name for layer, _ in missing_learning_rules(net)]
    if untrainable:
        net.notes.append(f"epsW, epsB, momW or momB not set (they belong in the params file); needed to train: "
                         f"{', '.join(untrainable)}")
    costs = net.costs
    if not costs:
        net.notes.append("no cost.logreg layer; needed to train (type=cost.logreg, inputs=labels,probs)")
    elif all(c["coeff"] == 0 for c in costs):  # trained with "train loss 0.0000", learning nothing, unsaid
        net.notes.append(f"coeff=0 on every cost ({', '.join(c.name for c in costs)}): the loss is always 0 and "
                         "training learns nothing; give a cost a coeff above 0 (cuda-convnet's logprob has 1)")
    elif len(costs) > 1:
        _refuse_heads_of_other_widths(net)
        # As cuda-convnet: the objective is the sum, coeff times each cost.
        terms = " + ".join(f"{c['coeff']:g}*{c.name}" for c in costs)
        net.notes.append(f"{len(costs)} cost layers: training minimises {terms}; train and eval report "
                         f"the error of '{costs[0].name}', the first in the file")
    for cost in costs:
        if cost["topk"] not in (1, 5):  # cuda-convnet printed it as it trained; it changes no gradient
            net.caution(f"layer '{cost.name}': topk={cost['topk']} is reported by eval, not by training, whose "
                        f"lines give the top-1 and top-5 errors: convspec eval --topk {cost['topk']}")
    read = net.read_layers()
    unused = [l.name for l in net.layers.values()
              if not l.type.startswith("cost.") and l.name not in read and not _is_labels(l)]
    if unused and any(l.type.startswith("cost.") for l in net.layers.values()):
        net.caution(f"unused layers (nothing reads them): {', '.join(unused)}")
    return net


# --- pass 1: sections -----------------------------------------------------------


LEARNING_RULES = ("epsW", "epsB", "momW", "momB")  # the keys cuda-convnet requires of a weight layer


def missing_learning_rules(net: CheckedNet) -> list[tuple[Layer, list[str]]]:
    """Weight layers lacking a learning rate or a momentum, with the keys each lacks: what
    convspec train refuses (check only notes it, since a layer file alone is checkable)."""
    missing = []
    for layer in net.layers.values():
        if LAYER_TYPES[layer.type].has_weights:
            keys = [k for k in LEARNING_RULES if (None in layer[k] if k in ("epsW", "momW") else layer[k] is None)]
            if keys:
                missing.append((layer, keys))
    return missing


def module_name(layer_name: str) -> str:
    """The name of a layer's module in the built PyTorch net: nn.Module names cannot contain '.'."""
    return layer_name.replace(".", "_")


def _sections_to_layers(spec: SpecFile, notes: list[str]) -> dict[str, Layer]:
    if not spec.sections:
        raise fail("empty spec: no [layer] sections; a spec starts with e.g. [data] and type=data",
                   Location(spec.path, 1, 1, spec.text.split("\n")[0] if spec.text else ""))
    layers: dict[str, Layer] = {}
    by_module: dict[str, str] = {}  # module name -> the section that has it
    for section in spec.sections:
        _check_section_name(section, layers)
        # [a.b] and [a_b] once built into one shared module, silently.
        other = by_module.setdefault(module_name(section.name), section.name)
        if other != section.name:
            raise fail(f"layers '{other}' and '{section.name}' would both be PyTorch module "
                       f"'{module_name(section.name)}' ('.' becomes '_'); rename one", section.loc)
        entries = _entry_map(section, notes)
        type_entry = entries.get("type")
        if type_entry is None and section.name == TRAIN_SECTION:
            raise fail(f"[{TRAIN_SECTION}] is the training recipe and belongs in the params file "
                       "(NAME.params.cfg beside the spec), not the layer file; move it there", section.loc)
        if type_entry is None and not any(e.key.lower() == "type" for s in spec.sections for e in s.entries):
            raise fail("no section has type=, so this looks like a layer-params file; give the layer file as SPEC "
                       "and this one with --params", section.loc)
        if type_entry is None:
            raise fail(f"layer '{section.name}' has no type=; add one, e.g. type=conv "
                       f"(types: {', '.join(LAYER_TYPES)})", section.loc)
        type_name = type_entry.value.raw
        if type_name not in LAYER_TYPES:
            if type_name in UNSUPPORTED_TYPES:
                msg = f"layer '{section.name}': type={type_name} is a cuda-convnet2 layer type convspec does not support"
            else:
                msg = (f"layer '{section.name}': unknown layer type '{type_name}'"
                       f"{did_you_mean(type_name, LAYER_TYPES) or '; types: ' + ', '.join(LAYER_TYPES)}")
            raise fail(msg, type_entry.value.loc)
        layers[section.name] = Layer(section.name, type_name, section.loc, entries)
    return layers


def _check_section_name(section: Section, seen: dict[str, Layer]) -> None:
    if section.name == "":
        if section.entries and section.loc == section.entries[0].loc:
            raise fail("key=value line before any [section]; put it under a layer's [name] header",
                       section.loc)
        raise fail("empty section name []; name the layer, e.g. [conv1]", section.loc)
    if any(c.isspace() or c in ",=" for c in section.name):
        raise fail(f"section name '{section.name}' contains a space, ',' or '='; "
                   "layer names are single words", section.loc)
    if any(c in "/\\" for c in section.name):
        # A layer's name also names files: convspec show wrote filters-NAME.png, so [../../x] aimed outside --out.
        raise fail(f"section name '{section.name}' contains '/' or '\\'; layer names also name files "
                   "(convspec show's filters-NAME.png), so use letters, digits, '_', '-' or '.'", section.loc)
    if section.name in seen:
        first = seen[section.name].loc
        raise fail(f"duplicate section [{section.name}] (first at line {first.line}); rename or merge one",
                   section.loc)


def _entry_map(section: Section, notes: list[str] | None = None) -> dict[str, Entry]:
    """Keys are case-insensitive, as cuda-convnet's ConfigParser makes them.

    A key repeated with the same value is harmless (some published files do
    it) and only noted; with a different value it is an error.
    """
    entries: dict[str, Entry] = {}
    for entry in section.entries:
        k = entry.key.lower()
        if k in entries:
            first = entries[k]
            if first.value.raw != entry.value.raw:
                raise fail(f"layer '{section.name}': duplicate key '{entry.key}' with a different value "
                           f"(first at line {first.loc.line}); keep one", entry.loc)
            if notes is not None:
                notes.append(f"{entry.loc}: layer '{section.name}': '{entry.key}' repeated with the same value")
            continue
        entries[k] = entry
    return entries


# --- pass 2: the params file ------------------------------------------------------


def _merge_params(layers: dict[str, Layer], params: SpecFile, net: CheckedNet) -> Section | None:
    train = None
    seen: dict[str, Section] = {}
    for section in params.sections:
        if section.name == "" and section.entries:
            raise fail("key=value line before any [section]; put it under a layer's [name] header",
                       section.loc)
        if section.name in seen:
            raise fail(f"duplicate section [{section.name}] (first at line {seen[section.name].loc.line}); "
                       "merge them", section.loc)
        seen[section.name] = section
        if section.name == TRAIN_SECTION and TRAIN_SECTION not in layers:
            train = section
            continue
        layer = layers.get(section.name)
        if layer is None:
            # cuda-convnet reads only the sections its layers ask for, and
            # published pairs carry such leftovers; say so rather than fail.
            net.caution(f"{section.loc}: params section [{section.name}] names no layer in the spec; "
                        f"ignored{did_you_mean(section.name, layers)}")
            continue
        layer.params_loc = section.loc
        for k, entry in _entry_map(section, net.notes).items():
            if k == "type":
                raise fail(f"layer '{section.name}': type= belongs in the layer file, not the params file",
                           entry.loc)
            if k in layer.entries:
                first = layer.entries[k].loc
                raise fail(f"layer '{section.name}': '{entry.key}' is set in both the layer file "
                           f"(line {first.line}) and the params file; keep one", entry.loc)
            layer.entries[k] = entry
    # A section for a missing layer alone is a leftover cuda-convnet ignores; a file that names others
    # while no layer with weights has a learning rate from either file is another spec's params file.
    strangers = [name for name in seen if name not in ("", TRAIN_SECTION) and name not in layers]
    weighted = [name for name, l in layers.items() if LAYER_TYPES[l.type].has_weights]
    if strangers and weighted and not any("epsw" in layers[name].entries for name in weighted):
        raise fail(f"gives no learning rate (epsW) to the layers with weights in {net.path} ({', '.join(weighted[:4])}"
                   f"{', ...' if len(weighted) > 4 else ''}) and names layers it lacks ({', '.join(strangers[:4])}"
                   f"{', ...' if len(strangers) > 4 else ''}); give the params file of this spec with --params",
                   Location(params.path))
    return train


# --- pass 3: keys ----------------------------------------------------------------


def _refuse_heads_of_other_widths(net: CheckedNet) -> None:
    """Every cost reads the one labels layer, so every head scores the same classes; a narrower
    auxiliary head failed only at the first training step, deep in cross-entropy."""
    first, *others = net.costs
    width = numel(net.layers[first.inputs[1]].shape)
    for cost in others:
        other = numel(net.layers[cost.inputs[1]].shape)
        if other != width:
            raise fail(f"layer '{cost.name}': its softmax '{cost.inputs[1]}' has {other} outputs but "
                       f"'{first.name}''s has {width}; every cost reads the same labels, so give each the same "
                       "outputs", cost.loc_of("inputs", 1))


def _resolve_keys(layer: Layer) -> None:
    ltype = LAYER_TYPES[layer.type]
    canonical: dict[str, Entry] = {}
    for k, entry in layer.entries.items():
        if k in REFUSED_KEYS:
            raise fail(f"layer '{layer.name}': {REFUSED_KEYS[k]}", entry.loc)
        if k in IGNORED_KEYS:
            continue
        legacy = LEGACY_SPELLINGS.get((layer.type, k))
        key = ltype.key(legacy or k)
        if key is None:
            names = [x.name for x in ltype.all_keys()]
            hint = did_you_mean(entry.key, names) or f"; {layer.type} takes {', '.join(names)}"
            raise fail(f"layer '{layer.name}': unknown key '{entry.key}' for type {layer.type}{hint}",
                       entry.loc)
        if key.name in canonical and ORIGIN in (entry.loc.path, canonical[key.name].loc.path):
            # --set replaces a key however the file spells it (runs were trained with --set filters=
            # on a numFilters= file); it is no second value the file holds.
            if entry.loc.path == ORIGIN:
                canonical[key.name] = entry
            continue
        if key.name in canonical:  # an old spelling and the new one, in either order
            spellings = (canonical[key.name].key, entry.key)
            old_one = next((k for k in spellings if (layer.type, k.lower()) in LEGACY_SPELLINGS), spellings[1])
            new_one = spellings[0] if old_one is spellings[1] else spellings[1]
            raise fail(f"layer '{layer.name}': both {old_one}= (old spelling) and {new_one}= are set; "
                       f"keep {new_one}=", entry.loc)
        canonical[key.name] = entry
    layer.entries = canonical

    if "inputs" in canonical:
        ctx = V.Ctx(layer.name, "inputs")
        layer.inputs = [V.to_word(item, ctx) for item in canonical["inputs"].value.items]
    n_inputs = max(len(layer.inputs), 1)
    for key in ltype.all_keys():
        if key.name == "type":
            continue
        layer.attrs[key.name] = _convert(layer, key, n_inputs)


def _shown_default(default: Any) -> str:
    if default is None:
        return "none"
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


def _convert(layer: Layer, key: Key, n_inputs: int) -> Any:
    entry = layer.entries.get(key.name)
    ctx = V.Ctx(layer.name, key.name)
    if entry is not None and not entry.value.items and key.default is not REQUIRED:
        # Read as the default, "initW=" would train with 0.01 where the file seemed to say something else.
        raise fail(f"layer '{layer.name}': {key.name}= has no value; give one or delete the line "
                   f"(the default is {_shown_default(key.default)})", entry.value.loc)
    if entry is None or not entry.value.items:
        if key.default is REQUIRED:
            doc = f" ({key.doc})" if key.doc else ""
            where = entry.value.loc if entry is not None else layer.loc
            raise fail(f"layer '{layer.name}': {layer.type} needs {key.name}=...{doc}", where)
        if key.per_input:
            return [key.default] * n_inputs
        return key.default
    items = entry.value.items
    if key.kind in ("names", "ints"):
        return [_convert_item(item, key, ctx) for item in items]
    if key.per_input:
        if len(items) not in (1, n_inputs):
            raise fail(f"layer '{layer.name}': {key.name} has {len(items)} values but the layer has "
                       f"{plural(n_inputs, 'input')}; give one value, or one per input",
                       entry.value.loc)
        converted = [_convert_item(item, key, ctx) for item in items]
        return converted * n_inputs if len(converted) == 1 else converted
    if len(items) != 1:
        raise fail(f"layer '{layer.name}': {key.name} takes one value, not {len(items)}", items[1].loc)
    return _convert_item(items[0], key, ctx)


def _convert_item(item, key: Key, ctx: V.Ctx) -> Any:
    kind = key.kind
    if kind in ("int", "ints"):
        return V.to_int(item, ctx, None if key.minimum is None else int(key.minimum))
    if kind == "float":
        return V.to_float(item, ctx, key.minimum, key.below)
    if kind == "share":
        return V.to_share(item, ctx)
    if kind == "bool":
        return V.to_bool(item, ctx)
    if kind in ("word", "names"):
        return V.to_word(item, ctx, key.choices)
    if kind == "neuron":
        return V.to_neuron(item, ctx)
    if kind == "schedule":
        return V.to_schedule(item, ctx)
    if kind == "shape":
        return V.to_shape(item, ctx)
    raise AssertionError(kind)


# --- pass 4: inputs and order ---------------------------------------------------------


def _is_labels(layer: Layer) -> bool:
    return layer.type == "data" and layer["dataIdx"] == 1  # cuda-convnet's providers put labels at 1


def _check_data_layers(layers: dict[str, Layer]) -> None:
    # A [labels] section that forgot dataIdx=1 is read as a second image layer
    # (dataIdx defaults to 0), which would only fail later as a missing image size.
    first: dict[int, Layer] = {}
    for layer in layers.values():
        if layer.type != "data":
            continue
        index = layer["dataIdx"]
        if index > 1:  # cuda-convnet's multi-input providers: a convspec data source gives two items
            raise fail(f"layer '{layer.name}': dataIdx={index}, but a convspec data source gives two items: the "
                       "images (dataIdx=0) and the labels (dataIdx=1)", layer.loc_of("dataIdx"))
        if index in first:
            kind, fix = {0: ("the images", "the labels are dataIdx=1"),
                         1: ("the labels", "keep one labels layer")}.get(index, (f"item {index}", "keep one"))
            raise fail(f"layer '{layer.name}': dataIdx={index} ({kind}) is already read by layer "
                       f"'{first[index].name}'; {fix}", layer.loc_of("dataIdx"))
        first[index] = layer


def _check_inputs(layers: dict[str, Layer]) -> None:
    _check_data_layers(layers)
    for layer in layers.values():
        ltype = LAYER_TYPES[layer.type]
        if ltype.num_inputs == 0:
            continue
        seen = set()
        for i, name in enumerate(layer.inputs):
            if name not in layers:
                # A layer defined above this one is the likelier meant input: one below it usually
                # reads this layer, so suggesting it would make a cycle ('pool9' -> pool1, not pool3).
                # (Listed only here, on the way to the error: checking a valid spec stays linear.)
                names = list(layers)
                above = names[:names.index(layer.name)]
                hint = did_you_mean(name, above) or did_you_mean(name, [n for n in names if n != layer.name])
                raise fail(f"layer '{layer.name}': input '{name}' is not defined{hint}",
                           layer.loc_of("inputs", i))
            if layers[name].type.startswith("cost."):
                raise fail(f"layer '{layer.name}': input '{name}' is a cost layer, which has no output",
                           layer.loc_of("inputs", i))
            if _is_labels(layers[name]) and not layer.type.startswith("cost."):
                raise fail(f"layer '{layer.name}': input '{name}' is the labels (dataIdx=1), which only a cost "
                           "layer reads; give the layer whose output this one takes", layer.loc_of("inputs", i))
            if name in seen and layer.type not in ("eltsum", "eltmax", "concat"):
                raise fail(f"layer '{layer.name}': input '{name}' is listed twice", layer.loc_of("inputs", i))
            seen.add(name)
        if ltype.num_inputs is not None and len(layer.inputs) != ltype.num_inputs:
            raise fail(f"layer '{layer.name}': {layer.type} takes {ltype.num_inputs} input"
                       f"{'s' if ltype.num_inputs > 1 else ''}, not {len(layer.inputs)}",
                       layer.loc_of("inputs"))


def _topological_order(layers: dict[str, Layer]) -> list[str]:
    """Kahn's algorithm; ties keep file order, so output reads like the file."""
    position = {name: i for i, name in enumerate(layers)}
    waiting = {name: len(set(l.inputs)) for name, l in layers.items()}
    readers: dict[str, list[str]] = {name: [] for name in layers}
    for name, layer in layers.items():
        for src in set(layer.inputs):
            readers[src].append(name)
    ready = [(position[n], n) for n, k in waiting.items() if k == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(name)
        for reader in readers[name]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, (position[reader], reader))
    if len(order) < len(layers):
        raise _cycle_error(layers, set(layers) - set(order))
    return order


def _cycle_error(layers: dict[str, Layer], stuck: set[str]) -> SpecError:
    # Walk inputs inside the stuck set until a name repeats: that loop is a cycle.
    start = min(stuck, key=lambda n: list(layers).index(n))
    path, name = [], start
    while name not in path:
        path.append(name)
        name = next(src for src in layers[name].inputs if src in stuck)
    cycle = path[path.index(name):] + [name]
    first = layers[cycle[0]]
    names = list(reversed(cycle))
    if len(names) > 12:  # one line, even for a generated spec's 3,000-layer loop
        names = names[:5] + [f"... ({len(names) - 10} more)"] + names[-5:]
    return fail(f"layer '{first.name}': inputs form a cycle: {' -> '.join(names)}; "
                "a layer cannot read its own output", first.loc_of("inputs", first.inputs.index(cycle[1])))


# --- pass 5: shapes and counts -----------------------------------------------------


def _infer(layer: Layer, net: CheckedNet, input_shape: tuple[int, int, int] | None) -> None:
    ltype: LayerType = LAYER_TYPES[layer.type]
    if ltype.num_inputs == 0:
        layer.shape = _data_shape(layer, net, input_shape)
        return
    sources = [net.layers[name] for name in layer.inputs]
    layer.input_shapes = [s.shape for s in sources]
    layer.input_types = [s.type for s in sources]
    layer.shape = ltype.shape(layer)
    layer.params, layer.macs = ltype.count(layer)
    if ltype.counts_neurons:
        layer.neurons = numel(layer.shape)


def _data_shape(layer: Layer, net: CheckedNet, input_shape) -> tuple[int, ...]:
    if layer["dataIdx"] == 1:
        if layer["inputSize"] is not None:  # e.g. --set labels.inputSize=... meant for the image layer
            net.notes.append(f"inputSize on '{layer.name}' has no effect: dataIdx=1 is the labels")
        return (1,)  # cuda-convnet's providers put the labels at dataIdx=1
    # The net sees crops: --input, else [train] crop=, else inputSize=.
    if input_shape is not None:
        return tuple(input_shape)
    crop = net.recipe.crop
    if layer["inputSize"] is not None:
        c, h, w = layer["inputSize"]
        if w in (1, 3) and c == h > 3:  # a square image written as HxWxC, as PyTorch users often do
            raise fail(f"layer '{layer.name}': inputSize={c}x{h}x{w} is read as channels x height x width "
                       f"({c} channels of {h}x{w}); did you mean inputSize={w}x{c}x{h}?", layer.loc_of("inputSize"))
        if crop:
            return (c, crop, crop)
        if h != w:  # the data pipeline cuts square crops: an h x w net once built, then failed in training
            raise fail(f"layer '{layer.name}': inputSize={c}x{h}x{w} is not square, and training and evaluation "
                       f"feed square crops (as cuda-convnet's did); use inputSize={c}x{h}x{h} or {c}x{w}x{w}",
                       layer.loc_of("inputSize"))
        return (c, h, w)
    if crop:
        return (3, crop, crop)
    # --set works in every command; --input only in check and bench (train gets it from the data's crop).
    raise fail(f"data layer '{layer.name}' has no image size: add inputSize=CxHxW to this section, or pass "
               f"--set {layer.name}.inputSize=CxHxW (e.g. --set {layer.name}.inputSize=3x32x32; check and bench "
               "also take --input 3x32x32)", layer.loc)


# --- pass 6: devices -------------------------------------------------------------------


def _plan_devices(net: CheckedNet) -> None:
    defaulted = []
    replicas: dict[str, int] = {}
    for layer in net.layers.values():
        if layer.type == "data":
            continue
        gpu = layer.attrs.get("gpu")
        if gpu is None:
            first = net.layers[layer.inputs[0]]
            if first.type == "data":
                gpu, layer.gpu_defaulted = [0], True
                defaulted.append(layer.name)
            else:
                gpu = list(first.gpu)
        if len(set(gpu)) != len(gpu):
            raise fail(f"layer '{layer.name}': gpu={','.join(map(str, gpu))} lists a GPU twice; "
                       "replicas must run on different GPUs", layer.loc_of("gpu"))
        layer.gpu = gpu
        input_replicas = {replicas[s] for s in layer.inputs if s in replicas}
        if len(input_replicas) > 1:
            raise fail(f"layer '{layer.name}': its inputs have different numbers of replicas "
                       f"({', '.join(f'{s}: {replicas[s]}' for s in layer.inputs if s in replicas)}); "
                       "give them equal gpu= lists", layer.loc_of("inputs"))
        for src in layer.inputs:
            if src in replicas and replicas[src] % len(gpu):
                raise fail(f"layer '{layer.name}': its {len(gpu)} replicas must divide the {replicas[src]} "
                           f"replicas of input '{src}'", layer.loc_of("gpu"))
        replicas[layer.name] = len(gpu)
        for index in gpu:
            totals = net.devices.setdefault(index, DeviceTotals())
            totals.layers += 1
            totals.params += layer.params
            totals.activation_bytes += 4 * numel(layer.shape) if not layer.type.startswith("cost.") else 0
    net.devices = dict(sorted(net.devices.items()))
    if defaulted:
        net.notes.append(f"no gpu= on layers fed straight from data; placed on gpu 0: {', '.join(defaulted)}")
