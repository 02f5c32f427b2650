"""Parameter counts and forward times of every registered network (README's model table).

    python benchmarks/model_table.py                       # CPU, 473x473, 1-shot, batch 1
    python benchmarks/model_table.py --device cuda --batch 8 --json out.json

Counts: total parameters, trainable head parameters (the backbone is frozen), and the DCM's share.
Times: median of ``--repeats`` eval-mode forwards after one warm-up (``torch.inference_mode``),
random weights (speed does not depend on the values).
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import argparse
import json
import platform
import statistics
import time

import torch

from models import build_model, list_models


def count(model):
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head_parameters())
    dcm_params = sum(p.numel() for n, p in model.named_parameters() if ".generators." in n or n.startswith("dcm"))
    return total, head, dcm_params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list_models())
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=473)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--shot", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    rows = []
    g = torch.Generator().manual_seed(0)
    q = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(dev)
    s = torch.randn(args.batch, args.shot, 3, args.size, args.size, generator=g).to(dev)
    m = (torch.rand(args.batch, args.shot, args.size, args.size, generator=g) < 0.3).long().to(dev)
    for name in args.models:
        model = build_model(name, backbone=args.backbone, shot=args.shot, backbone_weights="random").to(dev).eval()
        total, head, dcm_params = count(model)
        times = []
        with torch.inference_mode():
            for i in range(args.repeats + 1):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(q, s, m)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t0)
        rows.append(dict(model=name, total_params=total, head_params=head, dcm_params=dcm_params, forward_s=statistics.median(times)))
        print(f"{name:12s} total {total / 1e6:7.2f} M  trainable head {head / 1e6:6.2f} M  (DCM {dcm_params / 1e6:4.2f} M)  "
              f"forward {rows[-1]['forward_s'] * 1e3:9.1f} ms", flush=True)
    env = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
               torch=torch.__version__, backbone=args.backbone, size=args.size, batch=args.batch, shot=args.shot, repeats=args.repeats)
    print(json.dumps(env))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(dict(env=env, rows=rows), indent=2))


if __name__ == "__main__":
    main()
