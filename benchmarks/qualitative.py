"""Qualitative grids: benchmark episodes as rows, with every model's prediction and DPCN's inner maps.

::

    python benchmarks/qualitative.py --checkpoint runs/dpcn/best.pth --checkpoint runs/baseline/best.pth \
        --data-root /data/VOC2012 --fold 0 --episodes 6 --pick worst --out grid.png
    python benchmarks/qualitative.py --checkpoint best.pth --episodes 4 --support-annotation box --out box.png

Each row is one episode of the benchmark protocol that ``benchmarks/evaluate.py`` would run for the
first checkpoint (its saved config; ``--dataset``, ``--data-root``, ``--fold``, ``--shot``, ``--scales``,
``--set`` change it the same way): the support image(s) with their mask (box mode: the box label in
green, the object's mask in yellow), the query, its ground truth, then per model its prediction with
the episode's foreground IoU (at the image's own resolution, 255 ignored) and, when the network gives
them, its maps as heat maps: DPCN's three SAM activation maps, M0 (initial pseudo mask) and Mr
(refined pseudo mask); PFENet's prior.

Episode choice, deterministic: a pool of ``--pool`` episodes (default 4 × ``--episodes``) is drawn
from the protocol's episode list with ``numpy.random.default_rng(--seed)``; ``--pick random`` shows
the first N of it, ``worst`` / ``best`` rank it by the IoU of the first model minus that of the second
(by the single model's IoU with one checkpoint) and show the N lowest / highest.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.engine.config import ConfigError, add_config_args, overrides_from_args  # noqa: E402

_MAP_TITLES = {"initial_pseudo_mask": "M0", "refined_pseudo_mask": "Mr", "prior_mask": "prior"}


def map_title(name: str) -> str:
    if name.startswith("activation_map_"):
        return "SAM " + name.rsplit("_", 1)[1]
    return _MAP_TITLES.get(name, name.replace("_", " "))


def foreground_iou(pred: np.ndarray, gt: np.ndarray, ignore_index: int = 255) -> float:
    """Foreground IoU of a binary prediction against a {0, 1, ignore} label (1.0 when both are empty)."""
    valid = gt != ignore_index
    p, g = (pred == 1) & valid, (gt == 1) & valid
    union = int((p | g).sum())
    return float((p & g).sum()) / union if union else 1.0


def _to_original(t, batch, size_hw, resize: str):
    """``[1, C, h, w]`` map of the network input → ``float32[C, H0, W0]`` at the query's own size."""
    import torch.nn.functional as F
    from benchmarks.scoring.protocols import content_shape
    h0, w0 = size_hw
    ch, cw = batch["query_img"].shape[-2:]
    x = t.float()
    if tuple(x.shape[-2:]) != (ch, cw):  # feature-size maps: to the input canvas first (as inference does)
        x = F.interpolate(x, size=(ch, cw), mode="bilinear", align_corners=True)
    nh, nw = (ch, cw) if resize == "none" else content_shape(h0, w0, (ch, cw), resize)
    x = F.interpolate(x[..., :nh, :nw], size=(h0, w0), mode="bilinear", align_corners=False)
    return x[0].cpu().numpy().astype(np.float32)


def predict_episode(model, datasets, index: int, resize: str, device, amp) -> dict:
    """One model on episode ``index`` at every scale: ``{'prob': [H0, W0], 'maps': {name: [H0, W0]}}``
    (probabilities and maps averaged over the scales, as the multi-scale evaluation does)."""
    import torch
    from benchmarks.datasets import collate_episodes
    from benchmarks.engine import amp_context
    from benchmarks.engine.inference import extra_maps
    prob, maps = None, {}
    for ds in datasets:
        batch = collate_episodes([ds[index]])
        hw = tuple(batch["query_label_orig"][0].shape)
        with torch.no_grad(), amp_context(device, amp):
            out = model(batch["query_img"].to(device), batch["support_imgs"].to(device),
                        batch["support_masks"].to(device))
        fg = torch.softmax(out["logits"].float(), 1)[:, 1:]
        p = _to_original(fg, batch, hw, resize)[0]
        prob = p if prob is None else prob + p
        for k, v in extra_maps([out]).items():
            m = _to_original(v, batch, hw, resize)[0]
            maps[k] = m if k not in maps else maps[k] + m
    n = len(datasets)
    return {"prob": prob / n, "maps": {k: np.clip(v / n, 0, 1) for k, v in maps.items()}}


def choose(scores: Sequence[float], n: int, pick: str) -> List[int]:
    """Positions in the pool of the rows to show (``scores`` in pool order; stable: ties keep pool order)."""
    if pick == "random":
        return list(range(min(n, len(scores))))
    sign = -1.0 if pick == "best" else 1.0
    return sorted(range(len(scores)), key=lambda i: sign * scores[i])[:n]


def _plain(text: str) -> str:
    """Text for PIL's built-in font, which lacks some symbols (×, …, dashes, superscripts)."""
    for a, b in (("×", "x"), ("…", "..."), ("–", "-"), ("—", "-"), ("⁰", "0"), ("ʳ", "r"), ("±", "+-")):
        text = text.replace(a, b)
    return text


def draw_grid(rows: List[dict], labels: List[str], header: str, tile: int, box_mode: bool):
    """The PIL figure: one row per episode (see the module docstring)."""
    from PIL import Image, ImageDraw
    from benchmarks.engine.inference import heatmap, overlay
    cells_per_row = []
    for r in rows:
        cells = []
        for k, (im, lab, mask) in enumerate(r["supports"]):
            pic = overlay(im, lab, color=(40, 200, 40))
            if box_mode:
                pic = overlay(np.asarray(pic), mask, color=(255, 230, 0), alpha=0.45)
            cells.append((f"support {k + 1}" + (" (box)" if box_mode else ""), pic))
        cells.append((f"query: {r['class_name']}", Image.fromarray(r["query"])))
        cells.append(("ground truth", overlay(r["query"], r["gt"], color=(40, 120, 255))))
        for label, res in zip(labels, r["results"]):
            cells.append((f"{label}: IoU {100 * res['iou']:.1f}", overlay(r["query"], (res["prob"] > 0.5).astype(np.uint8))))
            for name, m in res["maps"].items():
                cells.append((f"{label}: {map_title(name)}", heatmap(m)))
        cells_per_row.append(cells)
    cols = max(len(c) for c in cells_per_row)
    lab_h = 14
    chars = max(20, cols * tile // 6)
    head = textwrap.wrap(_plain(header), chars)[:4]
    head_h = 6 + 12 * len(head)
    canvas = Image.new("RGB", (cols * tile, head_h + len(rows) * (tile + lab_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(head):
        draw.text((4, 3 + 12 * i), line, fill=(0, 0, 0))
    max_chars = max(4, tile // 6)
    for ri, cells in enumerate(cells_per_row):
        y = head_h + ri * (tile + lab_h)
        for ci, (title, im) in enumerate(cells):
            w, h = im.size
            s = tile / max(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
            x = ci * tile
            canvas.paste(im, (x + (tile - im.size[0]) // 2, y + lab_h + (tile - im.size[1]) // 2))
            t = _plain(title)
            t = t if len(t) <= max_chars else t[:max_chars - 2] + ".."
            draw.text((x + 2, y + 1), t, fill=(0, 0, 0))
    return canvas


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", "-m", action="append", required=True,
                   help="a training checkpoint (repeat for several models; the first one's protocol is used)")
    p.add_argument("--label", action="append", default=None, help="name of a model (one per --checkpoint)")
    add_config_args(p, include=["dataset", "data_root", "fold", "shot", "device"])
    p.add_argument("--episodes", "-n", dest="rows", type=int, required=True,
                   help="rows: episodes to show (the protocol's episode list stays the evaluation's)")
    p.add_argument("--pool", type=int, default=None, help="episodes to choose from (default 4 × --episodes)")
    p.add_argument("--pick", choices=["worst", "best", "random"], default="random",
                   help="rows: the worst / best of the pool (first model's IoU minus the second's, or the "
                        "single model's IoU) or the first of the seeded pool (default random)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pool draw (default 0)")
    p.add_argument("--scales", type=int, nargs="+", default=None, help="test input sizes (default: the protocol's)")
    p.add_argument("--support-annotation", choices=["mask", "box"], default=None,
                   help="supports annotated by masks (default) or by their boxes (paper Table A2)")
    p.add_argument("--tile", type=int, default=160, help="side of one picture in pixels (default 160)")
    p.add_argument("--out", "-o", required=True, help="the figure file (.png)")
    args = p.parse_args(argv)
    if args.rows < 1 or args.rows > 100:
        p.error(f"--episodes: expected 1..100 rows, got {args.rows}")
    if args.pool is not None and args.pool < args.rows:
        p.error(f"--pool: expected at least --episodes ({args.rows}), got {args.pool}")
    if args.tile < 32 or args.tile > 1024:
        p.error(f"--tile: expected 32..1024 pixels, got {args.tile}")
    if args.seed < 0:
        p.error(f"--seed: expected a non-negative integer, got {args.seed}")
    if args.label is not None and len(args.label) != len(args.checkpoint):
        p.error(f"--label: give one per --checkpoint ({len(args.checkpoint)}), got {len(args.label)}")
    if args.pick != "random" and len(args.checkpoint) > 2:
        print("note: --pick ranks by the first two models", file=sys.stderr)
    if Path(args.out).is_dir():
        p.error(f"--out: '{args.out}' is a folder; give a file name such as grid.png")
    return args


def build(args):
    """(models, labels, cfg, protocol, factory) of the command line."""
    from benchmarks.engine import eval_factory, eval_protocol, load_checkpoint_model, resolve_device
    overrides = overrides_from_args(args)
    if args.scales:
        overrides.append(f"eval.scales=[{','.join(map(str, args.scales))}]")
    models, cfgs = [], []
    for ck in args.checkpoint:
        m, c = load_checkpoint_model(ck, overrides=overrides)
        models.append(m)
        cfgs.append(c)
    device = resolve_device(cfgs[0]["run"]["device"])
    for m in models:
        m.to(device).eval()
    cfg = cfgs[0]
    protocol = eval_protocol(cfg)
    if args.support_annotation is not None:
        protocol = dataclasses.replace(protocol, support_annotation=args.support_annotation)
    labels = list(args.label) if args.label else [c["model"]["name"] for c in cfgs]
    if not args.label and len(set(labels)) < len(labels):
        labels = [f"{n} ({Path(ck).resolve().parent.name})" for n, ck in zip(labels, args.checkpoint)]
    return models, labels, cfg, protocol, eval_factory(cfg), device


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        models, labels, cfg, protocol, factory, device = build(args)
        seed = protocol.seeds[0]
        datasets = [factory(protocol, seed, s) for s in protocol.scales]
        ds = datasets[0]
        pool_n = min(len(ds), args.pool or 4 * args.rows)
        pool = np.random.default_rng(args.seed).permutation(len(ds))[:pool_n].tolist()
        amp = cfg["train"]["amp"]
        cache: Dict[tuple, dict] = {}

        def result(mi: int, e: int) -> dict:
            if (mi, e) not in cache:
                res = predict_episode(models[mi], datasets, e, protocol.resize, device, amp)
                ep = ds.episode(e)
                _, gt = ds._load(ep.query, ep.class_id)
                res["iou"] = foreground_iou((res["prob"] > 0.5).astype(np.uint8), gt, protocol.ignore_index)
                cache[(mi, e)] = res
            return cache[(mi, e)]

        if args.pick == "random":
            scores = [0.0] * len(pool)
        elif len(models) == 1:
            scores = [result(0, e)["iou"] for e in pool]
        else:
            scores = [result(0, e)["iou"] - result(1, e)["iou"] for e in pool]
        chosen = [pool[i] for i in choose(scores, args.rows, args.pick)]
        rows = []
        for e in chosen:
            ep = ds.episode(e)
            q_img, gt = ds._load(ep.query, ep.class_id)
            sups = []
            for s in ep.supports:
                im, lab = ds.load_support(s, ep.class_id)
                _, mask = ds._load(s, ep.class_id)
                sups.append((im, lab, mask))
            rows.append({"supports": sups, "query": q_img, "gt": gt,
                         "class_name": str(ds.class_names.get(ep.class_id, ep.class_id)),
                         "results": [result(mi, e) for mi in range(len(models))]})
        rule = {"random": f"the first {len(chosen)} of a pool of {pool_n} episodes drawn with seed {args.seed}",
                "worst": f"the {len(chosen)} lowest of a pool of {pool_n} (seed {args.seed}) by "
                         + ("IoU" if len(models) == 1 else f"IoU({labels[0]}) - IoU({labels[1]})"),
                "best": f"the {len(chosen)} highest of a pool of {pool_n} (seed {args.seed}) by "
                        + ("IoU" if len(models) == 1 else f"IoU({labels[0]}) - IoU({labels[1]})")}[args.pick]
        legend = "; support: box label green, object mask yellow" if protocol.support_annotation == "box" else ""
        header = (f"{protocol.describe()} | rows: {rule} | IoU: foreground IoU of the episode at the image's "
                  f"own resolution{legend}")
        fig = draw_grid(rows, labels, header, args.tile, protocol.support_annotation == "box")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.save(out)
    except (ConfigError, FileNotFoundError, ValueError, TypeError, ImportError, OSError) as e:
        from benchmarks.engine import short_error
        print(f"error: {short_error(e)}", file=sys.stderr)
        return 2
    ious = ", ".join(f"{labels[mi]} {np.mean([r['results'][mi]['iou'] for r in rows]) * 100:.1f}"
                     for mi in range(len(models)))
    print(f"protocol: {protocol.describe()}")
    print(f"wrote {out} ({len(rows)} episode(s), {fig.size[0]}x{fig.size[1]} px; mean episode IoU of the rows: {ious})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
