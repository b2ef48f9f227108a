"""``convspec show``: options in, :func:`runtime.show.show` called, files listed."""

from __future__ import annotations

import click

from .cli import _Whole, _a_path, _guard
from .errors import did_you_mean, fail

PICTURES = ("curves", "filters", "preds", "neighbours", "net")
MAX_NEIGHBOURS = 32  # one row of thumbnails each: 32 make a picture 3,612 px wide


def _picture_list(ctx, param, value):
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:  # drawing nothing would still replace index.html with an empty page
        raise click.BadParameter(f"names no picture; choose from {', '.join(PICTURES)}")
    for name in names:
        if name not in PICTURES:
            raise click.BadParameter(f"no picture '{name}'{did_you_mean(name, PICTURES)} "
                                     f"(choose from {', '.join(PICTURES)})")
    return names


def _one_name_each(ctx, param, value):
    for name in value:
        if "," in name:
            repeated = " ".join(f"--layer {n.strip()}" for n in name.split(",") if n.strip())
            raise click.BadParameter(f"takes one layer name; repeat it: {repeated}")
    return value


@click.command()
@click.argument("run_dir", required=False, type=click.Path(), metavar="[RUN]", callback=_a_path)
@click.option("--out", type=click.Path(file_okay=False), callback=_a_path,
              help="Folder for the PNGs and index.html.  Default: RUN/show (for a .pt file: its folder's show/).")
@click.option("--only", callback=_picture_list, metavar="LIST",
              help=f"Comma list of pictures: {','.join(PICTURES)}.  Default: all of them, skipping "
                   "(with a note) any the run cannot give.")
@click.option("--compare", multiple=True, type=click.Path(exists=True), metavar="RUN",
              help="Another run folder whose curves go on the same plot.  Repeatable.")
@click.option("--layer", "layers", multiple=True, metavar="NAME", callback=_one_name_each,
              help="Conv layer whose filters to draw.  Repeatable.  Default: every conv layer fed by the data "
                   "layer (colour tiles); deeper layers are drawn as grey tiles, one per input channel.")
@click.option("--data", metavar="PATH", callback=_a_path,
              help="Test images for preds and neighbours (class folders, CIFAR batches or a prepared store, "
                   "mapped through the run's classes).  Default: the run's validation images.")
@click.option("--synsets", type=click.Path(dir_okay=False, exists=True),
              help="'wnid name' lines giving readable class names (ImageNet's synsets file).")
# The caps keep one picture drawable: each image is a tile of the same PNG.
@click.option("--count", type=_Whole(1, 256), help="preds: how many test images (default 16, at most "
                                                            "256); neighbours: how many neighbours per image "
                                                            "(default 6, at most 32).")
@click.option("--queries", default=5, show_default=True, type=_Whole(1, 64),
              help="neighbours: how many test images (rows; at most 64).")
@click.option("--errors-only", is_flag=True, help="preds and neighbours: only images the net gets wrong (top-1).")
@click.option("--search-limit", default=10_000, show_default=True, type=_Whole(0),
              help="neighbours: search this many training images (a fixed random subset); 0 searches all.")
@click.option("--devices", metavar="DEVICES",
              help="Where to run the net, e.g. cpu or cuda:0.  Default: cuda:0 if present, else cpu.")
@click.pass_context
def show(ctx, run_dir, out, only, compare, layers, data, synsets, count, queries, errors_only, search_limit,
         devices):
    """Draw a trained run as PNG pictures and one static index.html.

    RUN is a folder convspec train wrote (default: the newest under runs/),
    or one of its .pt checkpoints.  The pictures: curves (error and loss per epoch, learning-rate
    changes marked), filters (learned kernels as tiles, like the AlexNet
    paper's Figure 3), preds (test images with their top-5 classes, Figure 4
    left), neighbours (training images nearest in the last hidden layer,
    Figure 4 right) and net (the layer graph, coloured by gpu= group).  Open
    RUN/show/index.html in a browser: no server needed.

    \b
    Examples:
      convspec show
      convspec show runs/cifar10-80sec-20261128-101500 --only curves --compare runs/cifar10-lrn-20261129-090000
      convspec show runs/alexnet --only filters --layer conv1a --layer conv1b
      convspec show runs/alexnet --only preds --errors-only --synsets ../shared/datasets/imagenet-synsets.txt
      convspec show runs/alexnet --only neighbours --count 6 --queries 5 --out /tmp/alexnet-pictures
    """
    from runtime.show import ShowOptions, show as run_show
    from runtime.train import parse_devices

    def run():
        if count is not None and count > MAX_NEIGHBOURS and (only is None or "neighbours" in only):
            # 256 neighbours a row made a 27,804-px-wide PNG that Pillow itself refuses to open.
            raise fail(f"--count {count}: the neighbours picture draws at most {MAX_NEIGHBOURS} neighbours per image; "
                       f"give --count {MAX_NEIGHBOURS} or less, or --only preds for more test images")
        options = ShowOptions(run=run_dir, out=out, only=only, compare=list(compare), layers=list(layers),
                              data=data, synsets=synsets, count=count, queries=queries, errors_only=errors_only,
                              search_limit=search_limit, devices=parse_devices(devices), progress=True,
                              echo=click.echo)
        result = run_show(options)
        click.echo(f"open {result.index}")

    _guard(ctx, run)
