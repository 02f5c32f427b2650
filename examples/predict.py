"""Segment an object in your own image from one or more examples of it.

Give the query image, and for each example (support) an image with a mask PNG -- or a bounding box
instead of a mask (the paper's Table A2)::

    python examples/predict.py --checkpoint runs/dpcn_synthetic_f0_efficientnet_lite0_1shot/best.pth \
        --query street.jpg --support dog1.jpg dog1_mask.png --support dog2.jpg --support-box 10,20,200,180 \
        --out out/ --figure

writes ``out/street_mask.png`` (0/255), ``out/street_overlay.png`` and with ``--figure`` a grid of the
supports, the prediction, DPCN's activation maps and pseudo masks (``out/street_figure.png``).

Masks: white (or bright grey, or alpha) = object, black = background; PNGs whose values are
0/1(/255) are read as labels (1 = object, 255 = ignore); a VOC-style label map (palette, grey, or RGB in
the VOC palette colours; class ids and 255 = void) with one class is read as that class (with a
warning), with several it needs --class-id; an RGB mask with any other colour than black, white and
the VOC palette, or a mask that is 255 everywhere, is refused. The rule in full:
benchmarks.engine.inference.load_mask (docs/DATA.md#colour-masks).
The same in Python: ``benchmarks.engine.inference.predict(model, query, [(img, mask_or_box), ...])``.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import math  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402


class _SupportAction(argparse.Action):
    """``--support IMAGE [MASK]`` then optionally ``--support-box x0,y0,x1,y1`` for the last support."""

    def __call__(self, parser, ns, values, option_string=None):
        items = getattr(ns, "supports", None) or []
        if option_string == "--support-box":
            if not items or items[-1][1] is not None:
                parser.error("--support-box must follow a --support IMAGE that has no mask")
            try:
                box = tuple(float(v) for v in values.split(","))
                if len(box) != 4 or not all(math.isfinite(v) for v in box):
                    raise ValueError
            except ValueError:
                parser.error(f"--support-box: expected x0,y0,x1,y1 (four finite numbers), got '{values}'")
            items[-1] = (items[-1][0], box)
        else:
            if len(values) not in (1, 2):
                parser.error("--support takes IMAGE [MASK]")
            items.append((values[0], values[1] if len(values) == 2 else None))
        ns.supports = items


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", "-m", required=True, help="a training checkpoint (best.pth / last.pth of a run)")
    p.add_argument("--query", "-q", required=True, help="the image to segment")
    p.add_argument("--support", nargs="+", action=_SupportAction, metavar=("IMAGE", "MASK"), dest="supports",
                   help="an example image and its mask PNG (repeat for K shots)")
    p.add_argument("--support-box", action=_SupportAction, metavar="x0,y0,x1,y1", dest="supports",
                   help="a bounding box (pixels) instead of a mask, for the --support just before it")
    p.add_argument("--out", "-o", default="predictions", help="output folder (default: predictions/)")
    p.add_argument("--size", type=int, default=None,
                   help="network input size (default: the checkpoint's test size, e.g. 473, or 96 for the synthetic demo)")
    p.add_argument("--scales", type=int, nargs="+", default=None, help="several input sizes = multi-scale testing")
    p.add_argument("--fusion", default="native", choices=["native", "vote", "average", "or"],
                   help="K-shot: native (all supports at once, DPCN's foreground concatenation) or 1-shot per "
                        "support fused by vote / average / or (paper Table 7)")
    p.add_argument("--class-id", type=int, default=None, help="masks are label maps: this value is the object")
    p.add_argument("--figure", action="store_true", help="also write a figure with activation maps / pseudo masks")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    args = p.parse_args(argv)
    if args.size is not None and args.size < 8:
        p.error(f"--size: expected an input size >= 8, got {args.size}")
    if args.scales is not None and any(v < 8 for v in args.scales):
        p.error(f"--scales: expected input sizes >= 8, got {args.scales}")
    from benchmarks.engine.output_paths import output_problem
    why = output_problem(args.out, "folder")  # before the work: never a traceback after the prediction
    if why:
        p.error(f"--out: {why}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.supports:
        print("error: at least one --support IMAGE MASK (or --support IMAGE --support-box x0,y0,x1,y1) is needed",
              file=sys.stderr)
        return 2
    missing = [(i + 1, img) for i, (img, m) in enumerate(args.supports) if m is None]
    if missing:
        print(f"error: support {missing[0][0]} ('{missing[0][1]}') has neither a mask (--support IMAGE MASK) nor a "
              f"box (--support-box x0,y0,x1,y1)", file=sys.stderr)
        return 2
    import numpy as np
    from PIL import Image

    from benchmarks.engine import load_checkpoint_model, resolve_device, test_size
    from benchmarks.engine.inference import PredictInputError, figure, load_image, overlay, predict

    try:
        for what, path in [("query image", args.query)] + [
                (f"support {i + 1}", p) for i, (img, m) in enumerate(args.supports)
                for p in ([img] + ([m] if not isinstance(m, tuple) else []))]:
            if not Path(path).is_file():
                raise PredictInputError(f"{what}: file '{path}' not found")
        device = resolve_device(args.device)
        model, cfg = load_checkpoint_model(args.checkpoint, device=device)
        size = args.size or test_size(cfg)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            pred = predict(model, args.query, args.supports, size=size, scales=args.scales, fusion=args.fusion,
                           class_id=args.class_id, device=device)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    except (PredictInputError, FileNotFoundError, ValueError, TypeError, ImportError) as e:
        from benchmarks.engine import short_error
        print(f"error: {short_error(e)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.query).stem
    query = load_image(args.query)
    files = [out / f"{stem}_mask.png", out / f"{stem}_overlay.png"]
    Image.fromarray((pred.mask * 255).astype(np.uint8)).save(files[0])
    overlay(query, pred.mask).save(files[1])
    if args.figure:
        from benchmarks.engine.inference import load_support
        sup = [load_support(s, i, args.class_id) for i, s in enumerate(args.supports)]
        files.append(out / f"{stem}_figure.png")
        figure(query, sup, pred).save(files[-1])
    fg = float(pred.mask.mean()) * 100
    print(f"{cfg['model']['name']} ({cfg['model']['backbone']}), {len(args.supports)} support(s), input {size}"
          f"{' fusion ' + args.fusion if len(args.supports) > 1 else ''}: foreground {fg:.1f}% of the query")
    for f in files:
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
