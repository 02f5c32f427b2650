"""Put DPCN's Dynamic Convolution Module into your own few-shot segmentation network.

``DynamicConvModule(C)`` takes the query feature ``[B, C, H, W]``, the support feature ``[B, K, C, h, w]``
and the support mask ``[B, K, h0, w0]``; it builds 5×1, 1×5 and 5×5 depthwise kernels from the
support's foreground and returns the three convolved query features. ``DCMFusion`` merges them into
your query feature: ``"residual"`` (``q + γ·ReLU(Conv1x1([q, maps]))``, ``γ = 0`` at initialisation, so
your network starts exactly as it was) or ``"replace"`` (``ReLU(Conv1x1([q, maps]))``, the paper's
description). This script does that with a deliberately tiny host (a 3-layer CNN + prototype
matching), trains the host with and without DCM on the synthetic few-shot set for a few hundred
iterations with ``--seeds`` training seeds, and prints every seed's mIoU, the mean ± std and the
paired difference with its 95 % interval over seeds (identical test episodes)::

    python examples/plug_into_your_model.py [--iters 300] [--seeds 3] [--fusion residual] [--kernel-norm none]
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import dcm.functional as DF  # noqa: E402
from dcm import DCMFusion, DynamicConvModule  # noqa: E402

#: the defaults of this example (docs/REAL_IMAGES.md: how they were chosen)
FUSION = "residual"
KERNEL_NORM = None


def conv(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyHost(nn.Module):
    """Your network: an encoder, a masked-average prototype, a small decoder -- plus, optionally, DCM."""

    def __init__(self, channels: int = 48, use_dcm: bool = True, fusion: str = FUSION, kernel_norm=KERNEL_NORM):
        super().__init__()
        c = channels
        self.encoder = nn.Sequential(conv(3, c, 2), conv(c, c), conv(c, c, 2), conv(c, c), conv(c, c, 2))  # stride 8
        # ---- the plug-in: kernels from the support, three maps, merged into the query feature ------
        self.dcm = DynamicConvModule(c, kernel_size=5, kernel_norm=kernel_norm) if use_dcm else None
        self.fuse = DCMFusion(c, len(self.dcm.variants), fusion) if use_dcm else None
        # -------------------------------------------------------------------------------------------
        self.decoder = nn.Sequential(conv(2 * c, c), conv(c, c), nn.Conv2d(c, 2, 1))

    def forward(self, query_img, support_imgs, support_masks):
        B, K = support_imgs.shape[:2]
        q = self.encoder(query_img)                                      # [B, C, h, w]
        s = self.encoder(support_imgs.flatten(0, 1)).unflatten(0, (B, K))  # [B, K, C, h, w]
        m = DF.prepare_mask(support_masks, s.shape[-2:])                 # [B, K, h, w], 255 -> 0
        proto = DF.masked_average_pool(s, m).mean(1)                     # [B, C]
        if self.dcm is not None:
            q = self.fuse(q, self.dcm(q, s, support_masks))              # 3 maps [B, C, h, w] -> q'
        logits = self.decoder(torch.cat([q, proto[:, :, None, None].expand_as(q)], 1))
        return F.interpolate(logits, size=query_img.shape[-2:], mode="bilinear", align_corners=True)


def run(use_dcm: bool, iters: int, size: int, seed: int = 0, episodes: int = 300, fusion: str = FUSION,
        kernel_norm=KERNEL_NORM):
    """Train ``TinyHost`` for ``iters`` iterations and return its :class:`benchmarks.EvaluationResult`."""
    from torch.utils.data import DataLoader

    from benchmarks import Protocol, build_dataset, collate_episodes, dataset_factory, evaluate

    torch.manual_seed(seed)
    model = TinyHost(use_dcm=use_dcm, fusion=fusion, kernel_norm=kernel_norm)
    train_set = build_dataset("synthetic", fold=0, shot=1, split="train", seed=seed, image_size=size,
                              episodes=iters * 8)
    loader = DataLoader(train_set, batch_size=8, collate_fn=collate_episodes)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=iters)
    model.train()
    for batch in loader:
        logits = model(batch["query_img"], batch["support_imgs"], batch["support_masks"])
        loss = F.cross_entropy(logits, batch["query_mask"], ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    protocol = Protocol(dataset="synthetic", fold=0, shot=1, episodes=episodes, seeds=(321,), scales=(size,))
    result = evaluate(lambda b: model(b["query_img"], b["support_imgs"], b["support_masks"]),
                      dataset_factory(image_size=size), protocol, batch_size=16)
    return result


def main(argv=None) -> int:
    from benchmarks.scoring.stats import format_interval, mean_std, paired_difference

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=300, help="training iterations per model (batch 8)")
    p.add_argument("--size", type=int, default=64, help="synthetic image size")
    p.add_argument("--episodes", type=int, default=300, help="test episodes (held-out classes)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per model: 0, 1, ... (default 3)")
    p.add_argument("--fusion", choices=["residual", "replace"], default=FUSION, help=f"DCMFusion mode ({FUSION})")
    p.add_argument("--kernel-norm", choices=["l1", "l2", "none"], default=KERNEL_NORM or "none",
                   help=f"DynamicConvModule kernel_norm ({KERNEL_NORM})")
    args = p.parse_args(argv)
    for name in ("iters", "size", "episodes", "seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
    norm = None if args.kernel_norm == "none" else args.kernel_norm
    names = ["TinyHost", f"TinyHost + DCM ({args.fusion}, kernel_norm={norm})"]
    miou = {n: {0: {}} for n in names}
    fbiou = {n: {0: {}} for n in names}
    protocol = None
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        for use_dcm, n in zip((False, True), names):
            r = run(use_dcm, args.iters, args.size, seed=seed, episodes=args.episodes, fusion=args.fusion,
                    kernel_norm=norm)
            miou[n][0][seed], fbiou[n][0][seed] = r.miou, r.fbiou
            protocol = r.protocol
    print(f"\n{protocol.describe()}; training seeds {', '.join(map(str, range(args.seeds)))}")
    print(f"{'':44}{'mIoU mean ± std':>18}{'FB-IoU':>8}   per-seed mIoU")
    for n in names:
        ms = mean_std(list(miou[n][0].values()))
        pm = f"{ms['mean']:.2f}" + (f" ± {ms['std']:.2f}" if ms["std"] is not None else "")
        print(f"{n:44}{pm:>18}{mean_std(list(fbiou[n][0].values()))['mean']:8.2f}   "
              + " ".join(f"{v:.2f}" for v in miou[n][0].values()))
    d = paired_difference(miou[names[0]], miou[names[1]])
    print(f"{'difference (DCM - host), paired by seed':44}{d['mean']:+18.2f}   95 % interval over seeds "
          f"{format_interval(d['ci95'])}")
    print(f"({(time.perf_counter() - t0) / 60:.1f} min, torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
