"""The ``convspec`` command line.  Commands turn options into calls of the
library's stages and print; errors are one located line (``--debug`` for a
traceback).

    convspec check specs/alexnet.cfg
    convspec check ../shared/reference-specs/cuda-convnet-layers-80sec.cfg --input 3x32x32 --json
"""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import SpecError
from .values import parse_shape


def _shape_option(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_shape(value, "--input", None)
    except SpecError as err:
        raise click.BadParameter(str(err).replace("--input ", "")) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convspec")
@click.option("--debug", is_flag=True, help="Show a Python traceback on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Describe a convolutional net in cuda-convnet's layer-definition language,
    check it and compile it to PyTorch, and prepare its data (training and
    evaluation commands come next).

    A spec is a layer file (sections such as [conv1] with type=conv, filters=64,
    inputs=data, neuron=relu, gpu=0) and a params file beside it with the
    learning rules (epsW, momW, wc ...): NAME.params.cfg, or cuda-convnet's
    layer-params-*.cfg pairing.

    \b
    Start with:
      convspec check specs/alexnet.cfg
    """
    ctx.obj = {"debug": debug}


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--params", "params_path", type=click.Path(dir_okay=False),
              help="Layer-params file.  Default: NAME.params.cfg or cuda-convnet's "
                   "layer-params pairing beside SPEC, if one exists.")
@click.option("--input", "input_shape", metavar="CxHxW", callback=_shape_option,
              help="Image size fed to the data layer, e.g. 3x224x224.  Overrides the spec's "
                   "inputSize=; needed for original cuda-convnet files, which have none.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.pass_context
def check(ctx, spec, params_path, input_shape, as_json):
    """Parse and check SPEC: shapes, parameters, devices.

    Prints one row per layer (type, gpu, output shape, parameters, neurons,
    multiply-adds per image), totals, and per-GPU totals.  Errors point at
    file:line:column.

    \b
    Examples:
      convspec check specs/alexnet.cfg
      convspec check ../shared/reference-specs/cuda-convnet-layers-80sec.cfg --input 3x32x32
      convspec check specs/alexnet.cfg --json | python -m json.tool
    """
    from .check import check_paths
    from .report import as_dict, as_text

    def run():
        net = check_paths(spec, params_path, input_shape)
        click.echo(json.dumps(as_dict(net), indent=2) if as_json else as_text(net))

    _guard(ctx, run)


@main.command()
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--size", default=256, show_default=True,
              help="Side of the stored square: short side rescaled to SIZE, centre crop (image folders).")
@click.option("--quality", default=90, show_default=True, type=click.IntRange(1, 100),
              help="JPEG quality of the stored images.")
@click.option("--raw", is_flag=True, help="Store raw uint8 pixels instead of JPEG (small images such as CIFAR).")
@click.option("--workers", default=0, type=click.IntRange(0), help="Decoding processes.  Default: one per core.")
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
        options = PrepareOptions(size=size, raw=raw, quality=quality, workers=workers)
        meta = run_prepare(Path(src), Path(out), options, Path(synsets) if synsets else None)
        counts = ", ".join(f"{split} {info['count']:,}" for split, info in meta["splits"].items())
        done = " (already complete; nothing to do)" if meta.get("already_complete") else ""
        click.echo(f"{out}: {meta['kind']} store of {meta['size']}x{meta['size']} images, "
                   f"{len(meta['classes'])} classes ({counts}); skipped {meta['skipped']} unreadable "
                   f"(see {Path(out) / 'report.txt'}){done}")

    _guard(ctx, run)


def _guard(ctx: click.Context, fn) -> None:
    """Run a command body: a SpecError is one message and exit status 1."""
    try:
        fn()
    except SpecError as err:
        if ctx.obj and ctx.obj.get("debug"):
            raise
        click.echo(f"error: {err}" if err.location is None else str(err), err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
