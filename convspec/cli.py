"""The ``convspec`` command line.  Commands turn options into calls of the
library's stages and print; errors are one located line (``--debug`` for a
traceback).

    convspec check specs/alexnet.cfg
    convspec check ../shared/reference-specs/cuda-convnet-layers-80sec.cfg --input 3x32x32 --json
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shlex
import socket
import sys
import textwrap

import click
from click.core import ParameterSource

from . import __version__
from .errors import SpecError, fail
from .recipe import PRECISIONS
from .values import LARGEST_WHOLE, parse_shape
from runtime.allocator import keep_freed_blocks


def _shape_option(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_shape(value, "--input", None)
    except SpecError as err:
        raise click.BadParameter(str(err).replace("--input ", "")) from None


class _Convspec(click.Group):
    """The convspec group.  --debug is the group's option, so ``convspec check X --debug``
    met click's bare "No such option: --debug"; the error now says where it goes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.NoSuchOption as err:
            if err.option_name == "--debug":
                command = ctx.invoked_subcommand or "COMMAND"
                err.message = f"--debug goes before the command: convspec --debug {command} ..."
            raise


@click.group(cls=_Convspec, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convspec")
@click.option("--debug", is_flag=True, help="Show a Python traceback on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Describe a convolutional net in cuda-convnet's layer-definition language,
    check it and compile it to PyTorch, prepare its data, train it, evaluate
    it and draw what it learned.

    A spec is a layer file (sections such as [conv1] with type=conv, filters=64,
    inputs=data, neuron=relu, gpu=0) and a params file beside it with the
    learning rules (epsW, momW, wc ...): NAME.params.cfg, or cuda-convnet's
    layer-params-*.cfg pairing.

    \b
    Start with:
      convspec check specs/alexnet.cfg
      convspec train specs/cifar10-80sec.cfg --data cifar10
      convspec eval --topk 5
      convspec show
      convspec bench specs/cifar10-80sec.cfg
    """
    ctx.obj = {"debug": debug}
    # Every command steps with the heap that training reaches anyway (runtime/allocator.py),
    # so that bench times layers, not page faults.
    keep_freed_blocks()


def _a_path(ctx, param, value):
    """An empty path (an unset shell variable: --out "$RUN") was read as no option by some
    commands (--out, --val-data: a new run, a held-out split) and as '.' by others."""
    if value == "":
        raise click.BadParameter("is an empty path; give a path, or leave it out")
    return value


# One spelling of the options that check, train and bench share.
params_option = click.option(
    "--params", "params_path", type=click.Path(dir_okay=False), callback=_a_path,
    help="Layer-params file.  Default: NAME.params.cfg or cuda-convnet's "
         "layer-params pairing beside SPEC, if one exists.")
input_option = click.option(
    "--input", "input_shape", metavar="CxHxW", callback=_shape_option,
    help="Image size fed to the data layer, e.g. 3x224x224.  Overrides the spec's "
         "inputSize=; needed for original cuda-convnet files, which have none.")


class _AsciiDigits:
    """Numbers in ASCII digits only: Python's int() and float() read any script's digits
    ('--epochs ٣', an Arabic-Indic three, trained 3 epochs), which the spec files refuse."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.isascii():
            self.fail(f"{value!r} is not a number in ASCII digits (0-9).", param, ctx)
        return super().convert(value, param, ctx)


class _Whole(_AsciiDigits, click.IntRange):
    pass


class _Real(_AsciiDigits, click.FloatRange):
    pass


class _CountOption(click.Option):
    """A count whose --help shows only its floor.  Its ceiling is a machine limit, kept so
    that a huge value is a usage error (whose message still states it), not a bound
    anyone chooses within: [1<=x<=2147483647] in every help was noise."""

    def get_help_extra(self, ctx: click.Context) -> dict:
        extra = super().get_help_extra(ctx)
        if "range" in extra:
            extra["range"] = f"x>={self.type.min}"
        return extra


def _a_number(ctx, param, value):
    """click's FloatRange lets nan through (every comparison with it is false): refuse it as it refuses inf."""
    if value is not None and value != value:
        raise click.BadParameter(f"{value} is not a number.")
    return value


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False), callback=_a_path)
@params_option
@input_option
@click.option("--set", "overrides", multiple=True, metavar="LAYER.KEY=VALUE",
              help="Override a spec or params value before checking, as train does, e.g. --set fc64.outputs=128 "
                   "(repeatable): an ablation's shapes and parameters before it trains.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.pass_context
def check(ctx, spec, params_path, input_shape, overrides, as_json):
    """Parse and check SPEC: shapes, parameters, devices.

    Prints one row per layer (type, gpu, output shape, parameters, neurons,
    multiply-adds per image), totals, and per-GPU totals.  Errors point at
    file:line:column.

    \b
    Examples:
      convspec check specs/alexnet.cfg
      convspec check ../shared/reference-specs/cuda-convnet-layers-80sec.cfg --input 3x32x32
      convspec check specs/alexnet.cfg --json | python -m json.tool
      convspec check specs/cifar10-80sec.cfg --set fc64.outputs=128
    """
    from .check import check_paths
    from .report import as_dict, as_text

    def run():
        net = check_paths(spec, params_path, input_shape, overrides=overrides)
        click.echo(json.dumps(as_dict(net), indent=2) if as_json else as_text(net))

    _guard(ctx, run)


@main.command()
@click.argument("src", type=click.Path(), callback=_a_path)
@click.argument("out", type=click.Path(file_okay=False), callback=_a_path)
@click.option("--size", type=_Whole(1),
              help="Side of the stored square: short side rescaled to SIZE, centre crop (image folders).  "
                   "Default: 256; CIFAR batches keep their 32x32.")
@click.option("--quality", default=90, show_default=True, type=_Whole(1, 100),
              help="JPEG quality of the stored images.")
@click.option("--raw", is_flag=True, help="Store raw uint8 pixels instead of JPEG (small images such as CIFAR).")
@click.option("--workers", default=0, type=_Whole(0),
              help="Decoding processes; 0, the default, is one per CPU this process may use.")
@click.option("--synsets", type=click.Path(dir_okay=False, exists=True),
              help="'wnid name' lines giving readable class names (ImageNet's synsets file).")
@click.pass_context
def prepare(ctx, src, out, size, quality, raw, workers, synsets):
    """Convert images once into a store that training reads fast.

    SRC is an image folder (SRC/train/<class>/*, optional SRC/val/<class>/*, or
    SRC/<class>/*) or a CIFAR python-batch folder.  OUT gets memory-mappable
    shards of SIZExSIZE images (JPEG, or raw with --raw), the class list, the
    training split's mean image and its RGB PCA, and report.txt listing images
    that could not be read (they are skipped and counted).  Interrupting is
    safe: run the same command again and it finishes the job.

    \b
    Examples:
      convspec prepare ../shared/datasets/imagenet-samples data/inet --synsets ../shared/datasets/imagenet-synsets.txt
      convspec prepare data/cifar-10-batches-py data/cifar10 --raw
      convspec prepare ../shared/datasets/cifar10-train data/c10 --size 32 --raw
    """
    from pathlib import Path

    from runtime.store import PrepareOptions, prepare as run_prepare

    def run():
        _at_most_one_per_cpu(f"--workers {workers}", workers, "decoding processes than CPUs only wait for each other")
        if raw and _typed(ctx, "quality"):
            raise fail("--quality sets the JPEG quality, and --raw stores no JPEG; drop one")
        options = PrepareOptions(size=size, raw=raw, quality=quality, workers=workers)
        meta = run_prepare(Path(src), Path(out), options, Path(synsets) if synsets else None)
        counts = ", ".join(f"{split} {info['count']:,}" for split, info in meta["splits"].items())
        done = " (already complete; nothing to do)" if meta.get("already_complete") else ""
        for note in meta.get("notes", []):
            click.echo(note)
        click.echo(f"{out}: {meta['kind']} store of {meta['size']}x{meta['size']} images, "
                   f"{len(meta['classes'])} classes ({counts}); skipped {meta['skipped']} unreadable "
                   f"(see {Path(out) / 'report.txt'}){done}")

    _guard(ctx, run)


@main.command()
@click.argument("spec", required=False, type=click.Path(dir_okay=False), callback=_a_path)
@params_option
@click.option("--data", envvar="CONVSPEC_DATA", show_envvar=True, metavar="PATH", callback=_a_path,
              help="Training data: a prepared store, a CIFAR python folder, an image folder "
                   "(DIR/train/<class>/*, or DIR/<class>/*), or cifar10 / cifar100 (downloaded once).")
@click.option("--val-data", metavar="PATH", callback=_a_path,
              help="Validation data (same kinds).  Default: valFraction of the training split, held out by splitSeed.")
@click.option("--epochs", type=_Whole(1, LARGEST_WHOLE), cls=_CountOption, help="Override [train] epochs.")
@click.option("--batch-size", type=_Whole(1, LARGEST_WHOLE), cls=_CountOption,
              help="Global minibatch, split across data-parallel ranks.  Override [train] batchSize (default 128).")
@click.option("--out", metavar="RUN", callback=_a_path, help="Run folder.  Default: a new runs/<spec>-<date>-<time>.")
@click.option("--resume", is_flag=True, help="Continue the run in --out (default: the newest under runs/) "
                                             "from its last checkpoint, with the settings it recorded (--epochs "
                                             "sets a new length; an option that would change the run is refused).")
@click.option("--devices", metavar="DEVICES",
              help="Comma list, e.g. cpu, cuda:0 or cuda:0,cuda:1: the spec's gpu= groups fold onto them.  "
                   "Default: every GPU, else the CPU.")
@click.option("--seed", type=_Whole(0, 2**63 - 1), cls=_CountOption, help="Override [train] seed (weights, data order, augmentation).")
@click.option("--precision", type=click.Choice(PRECISIONS),
              help="bf16 runs the layers under autocast (changes results slightly; the loss stays fp32): "
                   "about 2x faster on a CPU with bf16 units (avx512_bf16 or AMX), far slower on one without.  "
                   "Default: [train] precision, else fp32.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="NHWC memory layout: the same results up to float rounding, and faster here "
                   "(3-8% a CIFAR-10 epoch on a 2-core CPU).  --no-channels-last keeps NCHW.")
@click.option("--compile", "compile_net", is_flag=True,
              help="torch.compile the net for training: the same results up to float rounding, but dropout "
                   "draws other masks; the first steps compile (about a minute).  Measured slower on this "
                   "project's 2-core CPU; try it on a GPU.")
@click.option("--set", "overrides", multiple=True, metavar="LAYER.KEY=VALUE",
              help="Override a spec or params value, e.g. --set conv1.epsW=0.002 or --set train.flip=1. "
                   "Repeatable; recorded with the run.")
@click.option("--train-limit", type=_Whole(1, LARGEST_WHOLE), cls=_CountOption,
              help="Train on this many images of the training split (a fixed random subset), for quick trials.")
@click.option("--synsets", type=click.Path(dir_okay=False, exists=True),
              help="'wnid name' lines giving readable class names to record with the run.")
@click.option("--keep", default=3, show_default=True, type=_Whole(1),
              help="Epoch checkpoints to keep (best.pt is kept as well).")
@click.option("--snapshot-minutes", type=_Real(0, 10**6), metavar="M", callback=_a_number,
              help="Within an epoch, rewrite RUN/interrupted.pt every M minutes, so that a killed process, a lost "
                   "rank or a crash loses at most M minutes (--resume continues from it exactly); 0: never.  "
                   "Default: 30, or on --resume the run's own.")
@click.option("--workers", type=_Whole(0), help="Decoding processes for JPEG stores and large image "
                                                        "folders.  Default: 0 on a CPU, up to 8 with a GPU.")
@click.option("--deterministic", is_flag=True, help="Deterministic kernels only (slower on a GPU).")
@click.option("--quiet", is_flag=True, help="No progress bars; epoch lines only.")
@click.option("--nproc-per-node", "nproc", type=_Whole(1), metavar="N",
              help="Train data parallel in N processes on this machine (torch.distributed: one per GPU, "
                   "or gloo ranks sharing the CPU's cores); each computes 1/N of every batch.  Rank 0 "
                   "prints; the others write to RUN/ranks/.")
@click.option("--nnodes", default=1, show_default=True, type=_Whole(1),
              help="Machines in the run: start the same command on each, with its --node-rank and node "
                   "0's --rdzv-endpoint.")
@click.option("--node-rank", default=0, show_default=True, type=_Whole(0),
              help="This machine's place among --nnodes (0 is the one that saves and prints).")
@click.option("--rdzv-endpoint", metavar="HOST:PORT",
              help="Node 0's address and a free port, where the machines meet (with --nnodes > 1).")
@click.pass_context
def train(ctx, spec, params_path, data, val_data, epochs, batch_size, out, resume, devices, seed, precision,
          channels_last, compile_net, overrides, train_limit, synsets, keep, snapshot_minutes, workers, deterministic,
          quiet, nproc, nnodes, node_rank, rdzv_endpoint):
    """Train SPEC on --data and keep checkpoints and metrics in a run folder.

    The recipe (epochs, batch size, learning-rate drops, validation split,
    augmentation) comes from the [train] section of the params file; options
    here override it.  Each epoch prints training loss and error and
    validation top-1/top-5 error, appends one JSON line to RUN/metrics.jsonl,
    and writes RUN/epoch-NNNN.pt (and best.pt when validation improves).
    Ctrl-C or SIGTERM saves RUN/interrupted.pt; --resume continues exactly.
    --nproc-per-node N (or torchrun) trains N data-parallel ranks; rank 0
    prints and saves.

    \b
    Examples:
      convspec train specs/cifar10-80sec.cfg --data cifar10
      convspec train specs/cifar10-80sec.cfg --data ../shared/datasets/cifar10-train --epochs 2
      convspec train specs/alexnet.cfg --data data/imagenet --devices cuda:0,cuda:1
      convspec train --resume --out runs/cifar10-80sec-20261128-101500
      convspec train specs/cifar10-80sec.cfg --data cifar10 --set fc64.outputs=128 --set train.flip=1
      convspec train specs/alexnet.cfg --data data/imagenet --nproc-per-node 4
      torchrun --nproc-per-node 4 -m convspec train specs/alexnet.cfg --data data/imagenet
    """
    from runtime.train import StoppedAtOnce, TrainingStopped, TrainOptions, parse_devices, train as run_train

    def unless_defaulted_on_resume(name, value):
        # A resumed run keeps its recorded precision and layout unless they are typed.
        return value if _typed(ctx, name) or not resume else None

    def run():
        _at_most_one_per_cpu(f"--workers {workers}" + (f" with --nproc-per-node {nproc}" if nproc else ""), workers,
                             "decoding processes than CPUs only wait for each other", times=nproc or 1)
        # From $CONVSPEC_DATA, the path is left to train, whose errors then say where it came from.
        from_env = ctx.get_parameter_source("data") is click.core.ParameterSource.ENVIRONMENT
        options = TrainOptions(spec=spec, params=params_path, data=None if from_env else data, val_data=val_data,
                               out=out, resume=resume, devices=parse_devices(devices),
                               precision=precision,  # None: the recipe's, or the resumed run's
                               channels_last=unless_defaulted_on_resume("channels_last", channels_last),
                               compile=unless_defaulted_on_resume("compile_net", compile_net),
                               overrides=list(overrides), epochs=epochs, batch_size=batch_size, seed=seed,
                               train_limit=train_limit, synsets=synsets, keep=keep,
                               snapshot_minutes=unless_defaulted_on_resume("snapshot_minutes", snapshot_minutes),
                               workers=workers,
                               deterministic=deterministic, progress=not quiet, echo=_echo_while_read)
        if nproc is not None:
            _launch_ranks(ctx, options, nproc, nnodes, node_rank, rdzv_endpoint)
            return
        if _typed(ctx, "nnodes") or _typed(ctx, "node_rank") or _typed(ctx, "rdzv_endpoint"):
            raise fail("--nnodes, --node-rank and --rdzv-endpoint place the ranks --nproc-per-node N starts; "
                       "give --nproc-per-node too")
        try:
            summary = run_train(options)
        except TrainingStopped as stop:
            if _speaks_for_this_machine():
                click.echo(str(stop), err=True)
            sys.exit(stop.exit_code)
        except StoppedAtOnce as stop:
            click.echo(str(stop), err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo("interrupted before training started; nothing new was saved", err=True)
            sys.exit(130)
        if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
            return
        last = summary.history[-1] if summary.history else None
        if last is not None and last["val_top1_error"] is not None:
            _echo_while_read(f"done: {summary.run_dir}  val top-1 {100 * last['val_top1_error']:.2f}%  "
                             f"top-{last.get('k', 5)} {100 * last['val_top5_error']:.2f}%  "
                             f"training {summary.train_seconds:.1f} s")
        else:
            _echo_while_read(f"done: {summary.run_dir}  training {summary.train_seconds:.1f} s")

    _guard(ctx, run)


def _speaks_for_this_machine() -> bool:
    """Under bare torchrun a machine's ranks share its terminal, and each said the same stop line:
    local rank 0 speaks for them.  Under convspec's launcher the others write to their own files."""
    from runtime.distributed import LAUNCHER_ENV

    return os.environ.get(LAUNCHER_ENV) is not None or os.environ.get("LOCAL_RANK", "0") == "0"


LAUNCHER_OPTIONS = ("nproc", "nnodes", "node_rank", "rdzv_endpoint")


def _launch_ranks(ctx, options, nproc: int, nnodes: int, node_rank: int, endpoint: str | None) -> None:
    """convspec train --nproc-per-node N: check what can be checked once, then run
    this same command as N torch.distributed ranks, and say in one line which rank
    failed, if one did."""
    import torch

    from runtime import distributed as D
    from runtime import runs
    from runtime.runs import RANK_LOGS
    from runtime.train import Trainer

    if D.launched_by_torchrun():
        raise fail("--nproc-per-node starts the ranks itself; under torchrun, leave it out")
    if nnodes > 1 and not endpoint:
        raise fail(f"--nnodes {nnodes}: give --rdzv-endpoint HOST:PORT, node 0's address and a free port, "
                   "the same on every machine")
    if node_rank >= nnodes:
        raise fail(f"--node-rank {node_rank} is not below --nnodes {nnodes}; number the machines 0 to {nnodes - 1}")
    if endpoint and nnodes == 1:
        raise fail("--rdzv-endpoint is where several machines meet; give --nnodes too, or leave it out")
    problem = endpoint and _endpoint_problem(endpoint)
    if problem:
        raise fail(f"--rdzv-endpoint {endpoint}: {problem}")
    if options.devices and any(d.startswith("cuda") for d in options.devices):
        raise fail(f"--devices {','.join(options.devices)} with --nproc-per-node: each rank takes its own GPU "
                   "(local rank r uses cuda:r); leave --devices out, and choose the GPUs with CUDA_VISIBLE_DEVICES")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and nproc > gpus:
        raise fail(f"--nproc-per-node {nproc}: this machine has {gpus} GPU{'s' if gpus > 1 else ''}, one per rank; "
                   f"use at most {gpus}")
    if options.resume and nnodes > 1 and options.out and not runs.has_checkpoints(pathlib.Path(options.out)):
        # Every rank loads the checkpoint, and a machine's own --out held only its ranks' logs: node 1
        # was told to start again without --resume while node 0 waited for it.
        raise fail(f"{options.out}: holds no checkpoint on this machine; every machine of a multi-machine run "
                   "resumes from the run's checkpoints, so each needs the run folder (one on a shared file "
                   "system, or a copy of node 0's)")
    # The spec, the options, the data path and the run folder, checked here once rather than by every
    # rank; reading the data itself is left to the ranks, which read it anyway.
    settled = Trainer(dataclasses.replace(options, echo=lambda text: None))
    settled.settle(world=nproc * nnodes)
    # A default name is made now, so that two launches in one second get two folders (the ranks get --out).
    settled_dir = runs.claim_new_run_dir(settled.run_dir) if settled.auto_named else settled.run_dir
    run_dir = str(settled_dir)
    del settled
    argv = (["--debug"] if ctx.obj and ctx.obj.get("debug") else []) + ["train"] \
        + _typed_args(ctx, leave_out=LAUNCHER_OPTIONS + ("out",)) + ["--out", run_dir]
    here = f"{nproc} on this machine" if nnodes == 1 else f"{nproc} on node {node_rank} of {nnodes}"
    count = os.environ.get("OMP_NUM_THREADS") or str(D.cpu_threads_per_rank(nproc))
    threads = "" if gpus else f", {count} thread{'' if count == '1' else 's'} each"
    first = node_rank * nproc  # torch.distributed numbers the ranks node by node
    others = "" if nproc == 1 else f"; ranks {first + 1}-{first + nproc - 1}" if nproc > 2 else f"; rank {first + 1}"
    writes = f" write{'s' if nproc == 2 else ''} to {run_dir}/{RANK_LOGS}/" if others else ""
    meet = "" if nnodes == 1 else f" once all {nnodes} machines have met at {endpoint}"
    _echo_while_read(f"starting {nproc * nnodes} rank{'s' if nproc * nnodes > 1 else ''} ({here}{threads})"
                     f"{meet}{others}{writes}")
    failed = D.launch(argv, nproc, os.path.join(run_dir, RANK_LOGS), nnodes, node_rank, endpoint)
    if failed is None:
        return
    if failed.rank < 0:  # Ctrl-C or SIGTERM reached the ranks too; rank 0 said what it saved
        sys.exit(128 - failed.exit_code)
    # convspec's own statuses between the ranks and the launcher are not the user's
    code = failed.exit_code if failed.exit_code > 0 and failed.exit_code not in (
        D.LOST_A_RANK, D.STOPPED_WITH_RANK_0, D.STOPPED_ON_AN_ERROR) else 1
    if failed.exit_code == D.STOPPED_WITH_RANK_0:
        sys.exit(1)  # an error every rank met; this machine's local rank 0 printed it on this terminal
    if failed.output is None and failed.exit_code > 0 and failed.exit_code != D.LOST_A_RANK:
        sys.exit(code)  # local rank 0 printed its own one-line error on this terminal
    if failed.exit_code == D.LOST_A_RANK:  # it lost a rank that stopped without a failure seen here
        said = ("lost contact with another rank, which stopped without a message here (on another machine? "
                "its own output says why)")
    elif failed.exit_code < 0:
        import signal
        try:
            name = signal.Signals(-failed.exit_code).name
        except ValueError:  # a number this platform has no name for
            name = f"signal {-failed.exit_code}"
        said = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    else:
        said = D.last_line(failed.output) or f"exit status {failed.exit_code} and no message"
    where = f"; all of its output: {failed.output}" if failed.output else ""
    resume = ""
    if (failed.exit_code < 0 or failed.exit_code == D.LOST_A_RANK) and runs.has_checkpoints(settled_dir):
        # Killed from outside, not stopped by its own error: the run goes on from its last checkpoint,
        # unless that is its last epoch's (a rank killed as the run ended was once told to continue).
        furthest = runs.peek(runs.resume_checkpoint(settled_dir)) or {}
        epochs = furthest.get("recipe", {}).get("epochs")
        if furthest.get("batch") == 0 and epochs is not None and furthest.get("epoch") == epochs:
            resume = f"; the run had already finished (epoch {epochs} of {epochs}): {run_dir} is complete"
        else:
            resume = (f"; continue from the last checkpoint with: convspec train --resume --out "
                      f"{shlex.quote(str(run_dir))} {os.environ.get(D.LAUNCHER_ENV, '')}".rstrip())
    click.echo(f"rank {failed.rank}: {said}{where}{resume}", err=True)
    sys.exit(code)


def _endpoint_problem(text: str) -> str | None:
    """What is wrong with HOST:PORT, before any rank starts: a host that cannot be found
    made every rank wait ten minutes for the rendezvous, amid torch's socket warnings."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return "expected HOST:PORT, e.g. 10.0.0.1:29500"
    if not 0 < int(port) < 65536:
        return f"port {port} is not a port (1 to 65535); give node 0's free port, e.g. 29500"
    try:
        socket.getaddrinfo(host.strip("[]"), int(port))  # [::1]: an IPv6 address in brackets
    except (socket.gaierror, UnicodeError) as err:
        return (f"cannot find the host {host} ({getattr(err, 'strerror', None) or err}); check the name, or give "
                "node 0's IP address")
    return None


def _typed_args(ctx: click.Context, leave_out=()) -> list[str]:
    """The command's options and arguments as the user typed them (their values,
    after click read them), to hand the same command to each rank."""
    args: list[str] = []
    for param in ctx.command.params:
        if param.name in leave_out or ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            # (one from the environment, such as $CONVSPEC_DATA, reaches the ranks in theirs)
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            args.append(str(value))
        elif param.is_flag and param.secondary_opts:  # --x/--no-x
            args.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            args.append(param.opts[0])
        elif param.multiple:
            for item in value:
                args += [param.opts[0], str(item)]
        else:
            args += [param.opts[0], str(value)]
    return args


@main.command(name="eval")
@click.option("--checkpoint", "checkpoint", metavar="RUN|FILE", callback=_a_path,
              help="A run folder (its best.pt, else its newest checkpoint) or a .pt file.  "
                   "Default: the newest run under runs/.")
@click.option("--data", metavar="PATH", callback=_a_path,
              help="Score every image under PATH instead of the run's validation split "
                   "(class folders are mapped through the run's class list).")
@click.option("--labels", type=click.Path(dir_okay=False, exists=True),
              help="For a flat folder of images: 'filename class' lines (ILSVRC's validation layout).")
@click.option("--topk", default=5, show_default=True, type=_Whole(1), help="k of the top-k error.")
@click.option("--views", type=click.Choice(["center", "10"]),
              help="centre crop, or the paper's 10 views with their softmax averaged.  "
                   "Default: the run's [train] testViews.")
@click.option("--devices", metavar="DEVICES",
              help="Where to run, e.g. cpu or cuda:0.  Default: cuda:0 if present, else cpu.")
@click.option("--batch-size", type=_Whole(1), help="Images per forward pass (default: the run's).")
@click.option("--per-class", is_flag=True, help="Also print each class's error.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"top1_error", "topk_error", "k", "images", "views", "checkpoint", "notes"} (errors as '
                   'fractions), and "per_class" with --per-class.')
@click.pass_context
def eval_(ctx, checkpoint, data, labels, topk, views, devices, batch_size, per_class, as_json):
    """Top-1 and top-k error of a trained net, in percent, as the paper reports them.

    \b
    Examples:
      convspec eval --topk 5
      convspec eval --checkpoint runs/cifar10-80sec-20261128-101500 --views 10
      convspec eval --checkpoint runs/alexnet/best.pt --data ILSVRC2012_val --labels val.txt --json
    """
    from runtime.evaluate import evaluate_checkpoint
    from runtime.train import parse_devices

    def run():
        if labels and not data:
            raise fail("--labels names the classes of a flat folder given with --data; give --data PATH too")
        done = evaluate_checkpoint(checkpoint, data, labels, topk, {"center": 1, "10": 10}.get(views),
                                   parse_devices(devices), batch_size, progress=not as_json)
        r = done.result
        if as_json:
            out = {"top1_error": r.top1_error, "topk_error": r.topk_error, "k": r.k, "images": r.images,
                   "views": r.views, "checkpoint": done.checkpoint,
                   # In it too: a script reading the numbers must see "these are training images".
                   "notes": [note.removeprefix("note: ") for note in done.notes]}
            if per_class:
                out["per_class"] = _per_class_rows(r, done.class_names)
            click.echo(json.dumps(out))
            for note in done.notes:  # and on stderr for the person at the terminal; stdout stays one object
                click.echo(note, err=True)
            return
        click.echo(f"{done.checkpoint} on {done.data}: {r.images:,} images, "
                   f"{views_described(r.views, done.whole_image)}")
        capped = ""
        if _typed(ctx, "topk") and topk > r.k:
            capped = f"   (--topk {topk} is more than the {r.k} classes)"
        elif r.k == len(done.class_names):  # a 0.00% that says nothing about the net, typed or by default
            capped = f"   (the top {r.k} of {r.k} classes always hold the right one)"
        click.echo(f"top-1 error {100 * r.top1_error:.2f}%   top-{r.k} error {100 * r.topk_error:.2f}%{capped}")
        for note in done.notes:
            click.echo(note)
        if per_class:
            rows = _per_class_rows(r, done.class_names)
            width = max(_columns(row["class"]) for row in rows + [{"class": "class"}])

            def padded(name: str) -> str:  # by terminal columns: a CJK character takes two
                return name + " " * (width - _columns(name))

            click.echo(f"{padded('class')}  images  top-1 err  top-{r.k} err")
            for row in rows:
                if row["images"]:
                    click.echo(f"{padded(row['class'])}  {row['images']:>6}  {100 * row['top1_error']:>8.2f}%"
                               f"  {100 * row['topk_error']:>8.2f}%")

    _guard(ctx, run)


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False), callback=_a_path)
@params_option
@input_option
@click.option("--batch-size", type=_Whole(1), help="Images per step.  Default: [train] batchSize (128).")
@click.option("--iterations", default=10, show_default=True, type=_Whole(1),
              help="Timed iterations; the report gives medians.")
@click.option("--warmup", default=2, show_default=True, type=_Whole(0),
              help="Untimed iterations first (allocator, kernel choice, caches).")
@click.option("--devices", metavar="DEVICES",
              help="As for train: cpu, cuda:0 or cuda:0,cuda:1.  Default: every GPU, else the CPU.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="bf16: layers under autocast, as train --precision bf16.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="NHWC memory layout, as train's default; --no-channels-last times NCHW.")
@click.option("--threads", type=_Whole(1), help="CPU threads.  Default: PyTorch's choice.")
@click.option("--set", "overrides", multiple=True, metavar="LAYER.KEY=VALUE",
              help="Override a spec or params value before timing, e.g. --set fc64.outputs=128 (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def bench(ctx, spec, params_path, input_shape, batch_size, iterations, warmup, devices, precision, channels_last,
          threads, overrides, as_json):
    """Time SPEC's training step, layer by layer, on a random batch (like caffe time).

    Each row is one layer (or towers fused into one call, e.g. conv1a+conv1b)
    run alone on the inputs it saw in a real forward pass, then back-propagated;
    the loss row is the cost layer.  Below the rows: the whole training step as
    convspec train runs it (forward + loss, backward, update) and its
    images/s; without learning rates in the params file there is no update to
    time, and the line says so.  Times are medians in milliseconds; share is a
    row's part of the sum of the rows.

    \b
    Examples:
      convspec bench specs/cifar10-80sec.cfg
      convspec bench specs/alexnet.cfg --batch-size 32 --iterations 3
      convspec bench specs/alexnet.cfg --devices cuda:0 --precision bf16 --json
      convspec bench specs/cifar10-80sec.cfg --no-channels-last
      convspec bench ../shared/reference-specs/cuda-convnet-layers-80sec.cfg --input 3x32x32
    """
    import torch

    from runtime.layer_times import as_text, bench as run_bench
    from runtime.train import parse_devices

    from .builder import build as build_net
    from .check import check_paths

    def run():
        device_list = parse_devices(devices)
        # 1000 threads on 2 CPUs timed their waiting, 200x slower
        _at_most_one_per_cpu(f"--threads {threads}", threads, "threads than CPUs time their waiting for each other")
        if threads:
            torch.set_num_threads(threads)
        net_spec = check_paths(spec, params_path, input_shape, overrides=overrides)
        torch.manual_seed(0)
        net = build_net(net_spec, device_list)
        if precision == "bf16" and net.devices[0].type == "cuda" and not torch.cuda.is_bf16_supported():
            raise SpecError(f"--precision bf16: {torch.cuda.get_device_name(net.devices[0])} has no bf16 "
                            "support; use fp32")
        result = run_bench(net, batch_size or net_spec.recipe.batch_size, iterations, warmup, precision,
                           channels_last, progress=not as_json)
        click.echo(json.dumps(result.as_dict(), indent=2) if as_json else as_text(result))

    _guard(ctx, run)


def views_described(views: int, whole_image: bool) -> str:
    """What eval's views were, in words; a crop the size of the image is not called a crop."""
    if views == 1:
        return "1 view (the whole image)" if whole_image else "1 view (centre crop)"
    if whole_image:
        return f"{views} views (the crop is the whole image: the image and its mirror, 5 times each)"
    return f"{views} views"


def _columns(text: str) -> int:
    """Terminal columns ``text`` takes: East Asian wide and full-width characters take two."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _per_class_rows(result, names: list[str]) -> list[dict]:
    rows = []
    for i, name in enumerate(names):
        n = int(result.per_class_images[i])
        rows.append({"class": name, "images": n,
                     "top1_error": result.per_class_top1_wrong[i] / n if n else None,
                     "topk_error": result.per_class_topk_wrong[i] / n if n else None})
    return rows


def _lost_another_rank(err: Exception) -> bool:
    """A collective that failed because another rank went away (killed, out of
    memory, its own error): gloo and NCCL say so in their own words."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        mark in text for mark in ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer"))


def _at_most_one_per_cpu(typed: str, count: int | None, why: str, times: int = 1) -> None:
    """Refuse more threads or processes than the CPUs this process may use (its affinity: a
    container's or taskset's share): they add no speed, and `prepare --workers 1000` forked a
    thousand decoders on two cores.  ``times``: the ranks that each start ``count``."""
    from runtime.distributed import usable_cpus

    cpus = usable_cpus()
    if count and count * times > cpus:
        total = f" ({count * times} in all)" if times > 1 else ""
        fix = f"use at most {cpus // times}" if cpus // times else "leave it at 0"
        raise fail(f"{typed}{total}: {cpus} CPU{'s are' if cpus > 1 else ' is'} available here, and more {why}; "
                   f"{fix}")


def _typed(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` was given (on the command line or from the environment), not defaulted."""
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


def _echo_while_read(text: str) -> None:
    """click.echo for training's lines, which outlive their reader: after
    ``convspec train ... | head`` closes the pipe, training goes on unheard
    (a broken pipe used to stop it after the first epoch)."""
    try:
        click.echo(text)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _guard(ctx: click.Context, fn) -> None:
    """Run a command body: a SpecError is one message and exit status 1, and so are
    OS errors (a path that cannot be written, a full disk) and running out of memory.
    Anything else is a case convspec did not foresee: one line too (exit status 3;
    2 is click's usage errors) that says so, because a bare traceback reads as the
    user's fault; --debug shows it."""
    debug = bool(ctx.obj and ctx.obj.get("debug"))
    try:
        fn()
    except SpecError as err:
        if debug:
            raise
        click.echo(f"error: {err}" if err.location is None else str(err), err=True)
        if os.environ.get("RANK", "0") != "0":
            from runtime.distributed import LAUNCHER_ENV, STOPPED_ON_AN_ERROR, STOPPED_WITH_RANK_0
            if os.environ.get(LAUNCHER_ENV):  # convspec's launcher: rank 0 says it on the terminal
                import time
                time.sleep(2)  # so that the launcher sees rank 0 stop first, not this copy of its error
                # every_rank: met together, through a collective. Otherwise likely the same (the data,
                # the options), and the launcher names this rank only if rank 0 had no error of its own.
                sys.exit(STOPPED_WITH_RANK_0 if err.every_rank else STOPPED_ON_AN_ERROR)
        sys.exit(err.exit_code)
    except OSError as err:  # a path that cannot be made, read or written; a full disk
        if debug:
            raise
        # A rename (a file written whole under a temporary name) fails for its target, not the temporary file.
        named = err.filename2 or err.filename
        what = f"{named}: {err.strerror or err}" if named else " ".join(str(err).split())
        fix = "check the path, its permissions and the free disk space"
        if named and os.path.islink(named) and not os.path.exists(named):  # mkdir said "File exists"
            what, fix = f"{named}: a link to {os.readlink(named)}, which does not exist", \
                "remove the link, or make the folder it points to"
        click.echo(f"error: {what}; {fix}", err=True)
        sys.exit(1)
    except Exception as err:  # noqa: BLE001 - the last line of defence, re-raised under --debug
        if debug:
            raise
        detail = " ".join(str(err).split()) or "(no message)"
        if _lost_another_rank(err):
            from runtime.distributed import LAUNCHER_ENV, LOST_A_RANK
            if os.environ.get(LAUNCHER_ENV):  # convspec's launcher names the rank that stopped first
                sys.exit(LOST_A_RANK)
            click.echo(f"error: rank {os.environ.get('RANK', '?')} lost contact with another rank "
                       f"({textwrap.shorten(detail, 120, placeholder=' ...')}); that rank's own output says why "
                       "it stopped", err=True)
            sys.exit(1)
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" \
                or "can't allocate memory" in detail:
            click.echo(f"error: out of memory ({textwrap.shorten(detail, 160, placeholder=' ...')}); use a smaller "
                       "--batch-size, or check the layer sizes (a huge fc layer's weights) with convspec check SPEC",
                       err=True)
            sys.exit(1)
        click.echo(f"error: unexpected {type(err).__name__}: {detail}. This is a convspec bug or a case it "
                   "does not handle: rerun as convspec --debug COMMAND ... for the traceback, and report it",
                   err=True)
        sys.exit(3)


from .show_command import show  # noqa: E402

main.add_command(show)

if __name__ == "__main__":
    main()
