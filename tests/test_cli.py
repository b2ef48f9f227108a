"""The ``convspec`` command line: tables, JSON, exit statuses and one-line errors.

    python -m pytest -q tests/test_cli.py

Runs ``convspec.cli.main`` in-process through click's ``CliRunner``; one test
runs ``python -m convspec`` as a subprocess.  Error messages are pinned
exactly, as poetry-core's tests pin their caret text.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner

from convspec.cli import main
from convspec.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE_80SEC = SHARED / "reference-specs" / "cuda-convnet-layers-80sec.cfg"

needs_shared = pytest.mark.skipif(not REFERENCE_80SEC.is_file(),
                                  reason=f"{REFERENCE_80SEC} is not present (../shared is missing)")

ALEXNET = str(ROOT / "specs" / "alexnet.cfg")

LAYER_KEYS = {"name", "type", "gpu", "shape", "params", "neurons", "macs", "settings"}

# A small valid spec (3*8*8*10 + 10 = 1,930 parameters) that the error table edits.
TINY = """\
[data]
type=data
inputSize=3x8x8

[labels]
type=data
dataIdx=1

[fc]
type=fc
inputs=data
outputs=10

[probs]
type=softmax
inputs=fc

[logprob]
type=cost.logreg
inputs=labels,probs
"""


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def write(tmp_path: Path, text: str | bytes, name: str = "t.cfg") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def assert_one_located_error(result, first_line: str) -> None:
    """Exit 1, nothing on stdout, no traceback, and on stderr the message line,
    optionally followed by the offending source line and a caret under it."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.rstrip("\n").split("\n")
    assert lines[0] == first_line
    assert len(lines) in (1, 3), lines
    if len(lines) == 3:
        assert lines[2].strip() == "^"


# --- check: the table and the JSON ---------------------------------------------------


def test_check_alexnet_prints_the_table():
    result = invoke("check", ALEXNET)
    assert result.exit_code == 0, result.output
    assert "60,965,224" in result.stdout
    assert result.stdout.split()[:7] == ["layer", "type", "gpu", "output", "params", "neurons", "MACs"]
    total = next(line for line in result.stdout.splitlines() if line.startswith("total"))
    assert total.split()[1:] == ["60,965,224", "659,272", "724,406,816"]
    assert "gpu 0: 15 layers, 32,531,112 parameters" in result.stdout
    assert "gpu 1: 12 layers, 28,434,112 parameters" in result.stdout


def test_check_alexnet_json():
    result = invoke("check", ALEXNET, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"layers", "total_params", "total_neurons", "total_macs", "devices"} <= set(report)
    assert report["total_params"] == 60965224
    assert report["total_neurons"] == 659272
    assert report["total_macs"] == 724406816
    for layer in report["layers"]:
        assert set(layer) == LAYER_KEYS, layer
    assert sum(layer["params"] for layer in report["layers"]) == report["total_params"]
    assert sum(layer["neurons"] for layer in report["layers"]) == report["total_neurons"]
    assert {gpu: d["params"] for gpu, d in report["devices"].items()} == {"0": 32531112, "1": 28434112}
    conv1a = next(layer for layer in report["layers"] if layer["name"] == "conv1a")
    # 48 filters of 3x11x11 plus 48 biases; 224 -> 55 with cuda-convnet's rounding up.
    assert conv1a == {"name": "conv1a", "type": "conv", "gpu": [0], "shape": [48, 55, 55],
                      "params": 48 * 3 * 11 * 11 + 48, "neurons": 48 * 55 * 55,
                      "macs": 48 * 55 * 55 * 3 * 11 * 11, "settings": "11x11/4 pad 0 relu epsW 0.01 momW 0.9 wc 0.0005"}


def test_check_shows_the_settings_an_ablation_edits():
    """The table had no neuron, pooling or rate column: an edited copy (or a --set) of a
    spec printed the baseline's table, line for line."""
    spec = str(ROOT / "specs" / "cifar10-80sec.cfg")

    def rows(*options):
        result = invoke("check", spec, *options)
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        column = lines[0].index("settings")
        return {line.split()[0]: line[column:] for line in lines[1:13]}

    baseline = rows()
    assert (baseline["conv1"], baseline["pool1"], baseline["pool2"], baseline["fc64"], baseline["probs"]) == (
        "5x5/1 pad 2 epsW 0.001 momW 0.9 wc 0.004", "max 3/2 relu", "avg 3/2", "relu epsW 0.001 momW 0.9 wc 0.03", "")
    edited = rows("--set", "pool1.pool=avg", "--set", "conv2.neuron=tanh[1,1]", "--set", "conv3.padding=1",
                  "--set", "fc64.epsW=linear[base=0.002;tgtFactor=0.25]", "--set", "pool3.stride=1",
                  "--set", "fc64.momW=0.95")
    assert (edited["pool1"], edited["conv2"], edited["fc64"], edited["conv3"], edited["pool3"]) == (
        "avg 3/2 relu", "5x5/1 pad 2 tanh[1,1] epsW 0.001 momW 0.9 wc 0.004",
        "relu epsW linear[base=0.002;tgtFactor=0.25] momW 0.95 wc 0.03", "5x5/1 pad 1 relu epsW 0.001 momW 0.9 wc 0.004",
        "avg 3/1")
    norm = invoke("check", str(ROOT / "specs" / "cifar10-11pct.cfg"))
    assert "size 9 scale 0.001 pow 0.75" in next(line for line in norm.stdout.splitlines() if line.startswith("rnorm1"))
    dropped = invoke("check", ALEXNET, "--set", "dropout6a.enable=0").stdout.splitlines()
    assert [line.split()[-1] for line in dropped if line.startswith("dropout6")] == ["off", "0.5"]


def test_check_tiny_spec_and_input_override(tmp_path):
    path = write(tmp_path, TINY)
    result = invoke("check", path)
    assert result.exit_code == 0, result.output
    assert "5 layers, 1,930 parameters, 10 neurons, 1,920 multiply-adds per image" in result.stdout
    data_only = write(tmp_path, "[data]\ntype=data\ndataIdx=0\ninputSize=3x8x8\n", "data-only.cfg")
    assert ": 1 layer, 0 parameters," in invoke("check", data_only).stdout
    # --input overrides inputSize=: 3*16*16*10 + 10.
    result = invoke("check", path, "--input", "3x16x16", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["total_params"] == 7690
    assert report["layers"][0]["shape"] == [3, 16, 16]


@needs_shared
def test_reference_spec_needs_input():
    result = invoke("check", str(REFERENCE_80SEC))
    assert_one_located_error(
        result,
        f"{REFERENCE_80SEC}:3:2: data layer 'data' has no image size: add inputSize=CxHxW to this section, or "
        "pass --set data.inputSize=CxHxW (e.g. --set data.inputSize=3x32x32; check and bench also take --input "
        "3x32x32)",
    )
    assert "--input" in result.stderr


@needs_shared
def test_reference_spec_with_input():
    result = invoke("check", str(REFERENCE_80SEC), "--input", "3x32x32")
    assert result.exit_code == 0, result.output
    assert "145,578" in result.stdout
    assert "cuda-convnet-layer-params-80sec.cfg" in result.stdout  # the paired params file was found
    report = json.loads(invoke("check", str(REFERENCE_80SEC), "--input", "3x32x32", "--json").stdout)
    assert report["total_params"] == 145578
    assert report["params_file"].endswith("cuda-convnet-layer-params-80sec.cfg")


# --- usage errors: exit 2 ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["3x32", "3x32x32x1", "0x32x32", "3x0x5", "axbxc", "", "-3x32x32", "3.5x32x32"])
def test_bad_input_value_is_a_usage_error(value):
    result = invoke("check", ALEXNET, f"--input={value}")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.rstrip("\n").split("\n")[-1] == (
        "Error: Invalid value for '--input': must be CxHxW with positive whole numbers, "
        f"e.g. 3x224x224, not '{value}'"
    )


@pytest.mark.parametrize("option", ["--epochs", "--batch-size", "--train-limit"])
def test_train_counts_past_what_the_recipe_takes_are_a_usage_error(option, tmp_path):
    """--epochs 99999999999999999999 was taken, where --set train.epochs= of it was refused."""
    result = invoke("train", ALEXNET, "--data", str(tmp_path), option, "99999999999999999999")
    assert result.exit_code == 2, result.output
    assert result.stderr.rstrip("\n").split("\n")[-1] == (
        f"Error: Invalid value for '{option}': 99999999999999999999 is not in the range 1<=x<=2147483647.")


def test_train_help_shows_a_counts_floor_not_the_machine_limit():
    """The ceiling above is a refusal's business, not the help's: it read [1<=x<=2147483647]."""
    text = invoke("train", "--help").output
    assert "2147483647" not in text and "9223372036854775807" not in text
    assert "[x>=1]" in text and "[x>=0]" in text


@pytest.mark.parametrize("command", ["prepare", "train", "train with ranks"])
def test_more_decoding_workers_than_cpus_are_refused_before_any_work(command, tmp_path):
    """prepare --workers 1000 forked a thousand decoders on two cores; under --nproc-per-node
    each rank starts its own."""
    from runtime.distributed import usable_cpus

    cpus = usable_cpus()
    cpus_are = f"{cpus} CPU{'s are' if cpus > 1 else ' is'} available here"
    why = "and more decoding processes than CPUs only wait for each other"
    if command == "prepare":
        args, said = [str(tmp_path / "src"), str(tmp_path / "out"), "--workers", str(cpus + 1)], \
            f"--workers {cpus + 1}: {cpus_are}, {why}; use at most {cpus}"
    elif command == "train":
        args, said = [ALEXNET, "--data", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                      "--workers", str(cpus + 1)], f"--workers {cpus + 1}: {cpus_are}, {why}; use at most {cpus}"
    else:
        args = [ALEXNET, "--data", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1",
                "--nproc-per-node", str(cpus + 1)]
        said = f"--workers 1 with --nproc-per-node {cpus + 1} ({cpus + 1} in all): {cpus_are}, {why}; leave it at 0"
    result = invoke(command.split()[0], *args)
    assert result.exit_code == 1, result.output
    assert result.output == f"error: {said}\n"
    assert not (tmp_path / "out").exists()


def test_snapshot_minutes_that_are_not_a_number_are_a_usage_error(tmp_path):
    """click's FloatRange took nan (every comparison with it is false), which then meant never."""
    for value, said in [("nan", "nan is not a number."), ("inf", "inf is not in the range 0<=x<=1000000.")]:
        result = invoke("train", ALEXNET, "--data", str(tmp_path), "--snapshot-minutes", value)
        assert result.exit_code == 2, result.output
        assert result.stderr.rstrip("\n").split("\n")[-1] == f"Error: Invalid value for '--snapshot-minutes': {said}"


def test_directory_is_a_usage_error(tmp_path):
    result = invoke("check", str(tmp_path))
    assert result.exit_code == 2
    assert f"Error: Invalid value for 'SPEC': File '{tmp_path}' is a directory." in result.stderr


def test_unknown_command_and_missing_argument():
    assert invoke("chek", ALEXNET).exit_code == 2
    assert invoke("check").exit_code == 2


def test_version_and_help():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("convspec, version ")
    result = invoke("check", "--help")
    assert result.exit_code == 0
    assert "--input CxHxW" in result.stdout and "--json" in result.stdout


def test_python_dash_m_convspec_help():
    result = subprocess.run([sys.executable, "-m", "convspec", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "check" in result.stdout
    assert "Traceback" not in result.stderr


# --- spec errors: exit 1, one located line ----------------------------------------------------


def test_missing_file(tmp_path):
    path = str(tmp_path / "missing.cfg")
    assert_one_located_error(invoke("check", path),
                             f"{path}: no such file; check the path (working directory: {os.getcwd()})")


def test_missing_params_file(tmp_path):
    spec = write(tmp_path, TINY)
    params = str(tmp_path / "nope.params.cfg")
    assert_one_located_error(invoke("check", spec, "--params", params),
                             f"{params}: no such file; check the path (working directory: {os.getcwd()})")


@pytest.mark.parametrize("data, message", [
    (b"", "{path}:1:1: empty spec: no [layer] sections; a spec starts with e.g. [data] and type=data"),
    (b"\n\n# only a comment\n",
     "{path}:1:1: empty spec: no [layer] sections; a spec starts with e.g. [data] and type=data"),
    (b"[a]\nx=\x001\n",
     "{path}:2:3: is a binary file, not a spec (a NUL byte); a spec is text of [section] and key=value lines"),
    (bytes(range(256)),
     "{path}:1:1: is a binary file, not a spec (a NUL byte); a spec is text of [section] and key=value lines"),
    ("[data]\ntype=data\n".encode("utf-16"), "{path}:1:1: is UTF-16 text, not UTF-8; save it as UTF-8"),
    (b"[a]\ntype=caf\xe9\n", "{path}:2:9: is not UTF-8 text (bad byte 0xe9); save it as UTF-8"),
    # Latin-1 in a comment is read (Python 2's ConfigParser never looked); in a value it is not.
    (b"[a]\n# by Andr\xe9\ntype=caf\xe9 # \xe9t\xe9\n", "{path}:3:9: is not UTF-8 text (bad byte 0xe9); save it as UTF-8"),
])
def test_unreadable_files(tmp_path, data, message):
    path = write(tmp_path, data)
    assert_one_located_error(invoke("check", path), message.format(path=path))


def test_a_cuda_convnet_file_with_latin1_comments_is_read_unmodified(tmp_path):
    """cuda-convnet read its files as bytes; convspec refused a Latin-1 comment."""
    text = (ROOT / "specs" / "cifar10-80sec.cfg").read_bytes()
    path = tmp_path / "latin1.cfg"
    path.write_bytes(b"# written by Andr\xe9, \xa9 2012\n" + text.replace(b"[conv1]", b"[conv1]  ; na\xefve", 1))
    shutil.copy(ROOT / "specs" / "cifar10-80sec.params.cfg", tmp_path / "latin1.params.cfg")
    result = invoke("check", str(path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["total_params"] == 145_578


def test_an_endless_or_huge_file_is_refused_not_read_forever(tmp_path):
    path = tmp_path / "huge.cfg"
    path.write_bytes(b"#" * (16 * 2**20 + 1))
    result = invoke("check", str(path))
    assert (result.exit_code, result.output) == (
        1, f"{path}: is over 16 MiB, which no spec is; give the path of a .cfg layer file\n")
    if os.path.exists("/dev/zero"):  # it used to hang here
        assert invoke("check", "/dev/zero").output.startswith("/dev/zero: is over 16 MiB")


# (edit of TINY, first line of the error with {path} for the file)
ERRORS = [
    # syntax
    (("[fc]", "[fc"), "{path}:9:1: section header '[fc' is missing its closing ']'"),
    (("outputs=10", "outputs 10"), "{path}:12:9: unexpected '10'; expected '='"),
    (("outputs=10", "outputs=10,"), "{path}:12:12: line ends too early; expected a number or a value"),
    (("outputs=10", "outputs=10]"), "{path}:12:11: unexpected ']'; expected ',', a comment or end of line"),
    (("inputs=data", "inputs=data\nneuron=tanh[1,2"),
     "{path}:12:16: line ends too early; expected ',' or ';' or ']'"),
    (("[data]", "x=1\n[data]"),
     "{path}:1:1: key=value line before any [section]; put it under a layer's [name] header"),
    # sections
    (("[probs]", "[fc]"), "{path}:14:2: duplicate section [fc] (first at line 9); rename or merge one"),
    (("[labels]", "[]"), "{path}:5:2: empty section name []; name the layer, e.g. [conv1]"),
    (("[probs]", "[pro bs]"),
     "{path}:14:2: section name 'pro bs' contains a space, ',' or '='; layer names are single words"),
    (("type=fc", "type=fcc"), "{path}:10:6: layer 'fc': unknown layer type 'fcc'; did you mean 'fc'?"),
    (("type=fc", "type=sfc"),
     "{path}:10:6: layer 'fc': type=sfc is a cuda-convnet2 layer type convspec does not support"),
    # keys and values
    (("outputs=10", "output=10"),
     "{path}:12:1: layer 'fc': unknown key 'output' for type fc; did you mean 'outputs'?"),
    (("outputs=10", "outputs=ten"), "{path}:12:9: layer 'fc': outputs must be a whole number, not 'ten'"),
    (("outputs=10", "outputs=0"), "{path}:12:9: layer 'fc': outputs=0 must be at least 1"),
    (("outputs=10", "outputs=10\noutputs=11"),
     "{path}:13:1: layer 'fc': duplicate key 'outputs' with a different value (first at line 12); keep one"),
    (("inputs=data", "inputs=data\nneuron=relux"),
     "{path}:12:8: layer 'fc': neuron: unknown neuron function 'relux'; did you mean 'relu'?"),
    (("inputs=data", "inputs=data\nneuron=tanh[1]"),
     "{path}:12:8: layer 'fc': neuron: neuron 'tanh' is written tanh[a,b] (f(x) = a * tanh(b * x)), "
     "not 'tanh[1]'"),
    (("inputs=data", "inputs=data\nepsW=dexp[base=0.1]"),
     "{path}:12:6: layer 'fc': epsW: dexp schedule needs tgtFactor, numSteps "
     "(as dexp[base=...;tgtFactor=...;numSteps=...])"),
    (("inputSize=3x8x8", "inputSize=3x8"),
     "{path}:3:11: layer 'data': inputSize must be CxHxW with positive whole numbers, e.g. 3x224x224, "
     "not '3x8'"),
    (("inputs=fc", "inputs=fc\ninitWFunc=foo.bar"),
     "{path}:17:1: layer 'probs': initWFunc names a Python function cuda-convnet would import and run; "
     "a spec must never run code, so use initW=STD (Gaussian) instead"),
    # the graph
    (("inputs=data", "inputs=dta"), "{path}:11:8: layer 'fc': input 'dta' is not defined; did you mean 'data'?"),
    (("inputs=data", "inputs=probs"),
     "{path}:11:8: layer 'fc': inputs form a cycle: fc -> probs -> fc; a layer cannot read its own output"),
    (("inputs=labels,probs", "inputs=labels,fc"),
     "{path}:20:15: layer 'logprob': the second input of cost.logreg must be a softmax layer, but 'fc' is fc"),
    (("type=softmax", "type=softmax\ngpu=0,0"),
     "{path}:16:5: layer 'probs': gpu=0,0 lists a GPU twice; replicas must run on different GPUs"),
]


@pytest.mark.parametrize("edit, message", ERRORS, ids=[m.split(": ", 1)[1][:40] for _, m in ERRORS])
def test_spec_errors_are_one_located_line(tmp_path, edit, message):
    old, new = edit
    assert TINY.count(old) == 1, old
    path = write(tmp_path, TINY.replace(old, new))
    assert_one_located_error(invoke("check", path), message.format(path=path))


def test_error_shows_the_source_line_and_caret(tmp_path):
    path = write(tmp_path, TINY.replace("inputs=data", "inputs=dta"))
    result = invoke("check", path)
    assert result.stderr == (f"{path}:11:8: layer 'fc': input 'dta' is not defined; did you mean 'data'?\n"
                             "inputs=dta\n"
                             "       ^\n")


def test_json_errors_are_not_json(tmp_path):
    # A failing --json run prints the same message on stderr and nothing on stdout.
    path = write(tmp_path, TINY.replace("type=fc", "type=fcc"))
    assert_one_located_error(invoke("check", path, "--json"),
                             f"{path}:10:6: layer 'fc': unknown layer type 'fcc'; did you mean 'fc'?")


# --- --debug ------------------------------------------------------------------------------------


def test_debug_raises_the_spec_error(tmp_path):
    path = write(tmp_path, TINY.replace("[fc]", "[fc"))
    result = invoke("--debug", "check", path)
    assert result.exit_code == 1
    assert isinstance(result.exception, SpecError)
    assert str(result.exception).split("\n")[0] == f"{path}:9:1: section header '[fc' is missing its closing ']'"
    shown = "".join(traceback.format_exception(*result.exc_info))
    assert shown.startswith("Traceback") and "convspec/parse.py" in shown.replace(os.sep, "/")
    with pytest.raises(SpecError):
        CliRunner().invoke(main, ["--debug", "check", path], catch_exceptions=False)


def test_without_debug_there_is_no_exception(tmp_path):
    path = write(tmp_path, TINY.replace("[fc]", "[fc"))
    result = invoke("check", path)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1


def test_debug_after_the_command_says_where_it_goes(tmp_path):
    """--debug is convspec's option, not the command's: after the command click said only
    "No such option '--debug'"."""
    path = write(tmp_path, TINY)
    result = invoke("check", path, "--debug")
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == "Error: --debug goes before the command: convspec --debug check ..."
    # Any other unknown option keeps click's own message (its wording varies with click's version).
    other = invoke("check", path, "--bogus").output.splitlines()[-1]
    assert other.startswith("Error: No such option") and "--bogus" in other and "goes before" not in other


def plant(monkeypatch, error: Exception) -> None:
    """Make `convspec check` raise ``error`` from inside the checker."""
    import importlib

    checker = importlib.import_module("convspec.check")  # the module, not convspec.check the function

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(checker, "check_paths", broken)


def test_an_unforeseen_error_is_one_line_and_debug_shows_it(tmp_path, monkeypatch):
    """The last line of defence: an exception convspec did not foresee (here planted in
    the checker) is still one line, names its type and message, and says what to do."""
    plant(monkeypatch, RuntimeError("required rank 4 tensor\nto use channels_last format"))
    path = write(tmp_path, TINY)
    result = invoke("check", path)
    assert result.exit_code == 3 and isinstance(result.exception, SystemExit)
    assert result.output == ("error: unexpected RuntimeError: required rank 4 tensor to use channels_last format. "
                             "This is a convspec bug or a case it does not handle: rerun as convspec --debug COMMAND ... "
                             "for the traceback, and report it\n")
    with pytest.raises(RuntimeError, match="required rank 4"):
        CliRunner().invoke(main, ["--debug", "check", path], catch_exceptions=False)


@pytest.mark.parametrize("error, line", [
    (FileNotFoundError(2, "No such file or directory", "/proc/convspec-run"),
     "error: /proc/convspec-run: No such file or directory; check the path, its permissions and the free disk space"),
    (OSError(30, "Read-only file system", "ro/run"),
     "error: ro/run: Read-only file system; check the path, its permissions and the free disk space"),
    # A file written under a temporary name and renamed: the target is what the user knows (and must fix).
    (IsADirectoryError(21, "Is a directory", "runs/x/.metrics.jsonl.tmp", None, "runs/x/metrics.jsonl"),
     "error: runs/x/metrics.jsonl: Is a directory; check the path, its permissions and the free disk space"),
    (OSError("921600 requested and 290688 written"),
     "error: 921600 requested and 290688 written; check the path, its permissions and the free disk space"),
])
def test_os_errors_name_the_path(tmp_path, monkeypatch, error, line):
    """Paths convspec cannot make, read or write (a read-only --out, a full disk) are one line, exit 1."""
    plant(monkeypatch, error)
    result = invoke("check", write(tmp_path, TINY))
    assert result.exit_code == 1 and result.output == line + "\n"


def test_out_of_memory_says_what_to_shrink(tmp_path, monkeypatch):
    # What torch raised for a 409,599,999,999,995,904-byte weight:
    plant(monkeypatch, RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate "
                                    "memory: you tried to allocate 409599999999995904 bytes. Error code 12 (Cannot "
                                    "allocate memory)"))
    result = invoke("check", write(tmp_path, TINY))
    assert result.exit_code == 1
    # Cut at a word, not mid-word ("Error code 12 (Cannot all").
    assert result.output == ("error: out of memory ([enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: "
                             "can't allocate memory: you tried to allocate 409599999999995904 bytes. Error code 12 "
                             "(Cannot ...); use a smaller --batch-size, or check the layer sizes (a huge fc layer's "
                             "weights) with convspec check SPEC\n")


def test_check_takes_set_as_train_does():
    """An ablation's parameter count before it trains: fc64 widened to 128 outputs."""
    spec = str(ROOT / "specs" / "cifar10-80sec.cfg")
    base = json.loads(invoke("check", spec, "--json").stdout)["total_params"]
    result = invoke("check", spec, "--set", "fc64.outputs=128", "--json")
    assert result.exit_code == 0, result.output
    # fc64 reads 64 channels of 4x4; fc10 reads fc64: (1024 + 1) * 64 + (64 + 1) * 10 become the same at 128.
    widened = base - (1024 + 1) * 64 - (64 + 1) * 10 + (1024 + 1) * 128 + (128 + 1) * 10
    assert json.loads(result.stdout)["total_params"] == widened == 211_818
    bad = invoke("check", spec, "--set", "fc64.outputs=x")
    assert (bad.exit_code, bad.stderr.splitlines()[0]) == (1, "--set:1:14: layer 'fc64': outputs must be a whole "
                                                              "number, not 'x'")


def help_examples(command: str) -> list[str]:
    """The ``convspec ...`` lines under 'Examples:' in COMMAND's --help (the top level's for '')."""
    result = CliRunner().invoke(main, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    _, _, examples = result.output.partition("Examples:")
    return [line.strip() for line in examples.splitlines() if line.strip().startswith("convspec ")]


def test_every_check_example_in_the_help_checks(monkeypatch):
    """A user pastes the help's examples first, so each `convspec check` one must pass as
    printed, run from the project root as the README says (an example whose
    --set broke the spec's channel counts shipped once).  The other commands' examples
    need data or runs; those that fit a test are run in their own tests."""
    monkeypatch.chdir(ROOT)
    examples = [line for name in ["", *main.commands] for line in help_examples(name)
                if line.startswith("convspec check ")]
    assert len(examples) >= 4, examples
    for line in examples:
        if "../shared" in line and not SHARED.is_dir():
            continue
        argv = shlex.split(line.split("|")[0])[1:]
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 0, f"{line}\n{result.output}"
        assert "params" in result.output or '"layers"' in result.output, line


@pytest.mark.parametrize("args, name", [
    (["train", "specs/cifar10-80sec.cfg", "--out", ""], "'--out'"),
    (["train", "specs/cifar10-80sec.cfg", "--val-data", ""], "'--val-data'"),
    (["train", "specs/cifar10-80sec.cfg", "--params", ""], "'--params'"),
    (["train", ""], "'[SPEC]'"),
    (["check", ""], "'SPEC'"),
    (["bench", ""], "'SPEC'"),
    (["eval", "--checkpoint", ""], "'--checkpoint'"),
    (["eval", "--data", ""], "'--data'"),
    (["prepare", "", "out"], "'SRC'"),
    (["prepare", "src", ""], "'OUT'"),
    (["show", "--out", ""], "'--out'"),
    (["show", ""], "'[RUN]'"),
])
def test_an_empty_path_is_refused_not_read_as_a_default(args, name):
    """--out "" (an unset variable: --out "$RUN") trained into a new runs/ folder, --val-data ""
    held images out of the training data, and --params "" was ': is a directory'."""
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (f"Error: Invalid value for {name}: is an empty path; give a path, "
                                              "or leave it out")


@pytest.mark.parametrize("args, name", [
    (["train", "specs/cifar10-80sec.cfg", "--epochs", "\u0663"], "'--epochs'"),
    (["train", "specs/cifar10-80sec.cfg", "--snapshot-minutes", "\u0663"], "'--snapshot-minutes'"),
    (["eval", "--topk", "\u0663"], "'--topk'"),
    (["bench", "specs/cifar10-80sec.cfg", "--iterations", "1\u0660"], "'--iterations'"),
    (["show", "--count", "\u0663"], "'--count'"),
])
def test_numbers_on_the_command_line_are_ascii_digits_as_in_the_files(args, name):
    """int() reads any script's digits: --epochs \u0663 (an Arabic-Indic three) trained 3 epochs,
    where filters=\u0663 in a spec is refused."""
    result = invoke(*args)
    assert result.exit_code == 2
    digits = args[-1]
    assert result.output.splitlines()[-1] == (f"Error: Invalid value for {name}: {digits!r} is not a number in "
                                              "ASCII digits (0-9).")
