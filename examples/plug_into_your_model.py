"""Put DPCN's Dynamic Convolution Module into your own few-shot segmentation network.

``DynamicConvModule(C)`` takes the query feature ``[B, C, H, W]``, the support feature ``[B, K, C, h, w]``
and the support mask ``[B, K, h0, w0]``; it builds 5×1, 1×5 and 5×5 depthwise kernels from the
support's foreground and returns the three convolved query features. Concatenate them to whatever your
decoder already consumes -- nothing else changes. This script does exactly that with a deliberately
tiny host (a 3-layer CNN + prototype matching), trains the host with and without DCM on the synthetic
few-shot set for a few hundred iterations (about a minute on a CPU) and prints both mIoUs on the
held-out classes::

    python examples/plug_into_your_model.py [--iters 300]
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
from dcm import DynamicConvModule  # noqa: E402


def conv(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyHost(nn.Module):
    """Your network: an encoder, a masked-average prototype, a small decoder -- plus, optionally, DCM."""

    def __init__(self, channels: int = 48, use_dcm: bool = True):
        super().__init__()
        c = channels
        self.encoder = nn.Sequential(conv(3, c, 2), conv(c, c), conv(c, c, 2), conv(c, c), conv(c, c, 2))  # stride 8
        # ---- the plug-in: one module, its output channels added to the decoder input -------------
        self.dcm = DynamicConvModule(c, kernel_size=5) if use_dcm else None
        extra = self.dcm.out_channels if use_dcm else 0  # 3·C for the (v, h, s) kernels
        # -------------------------------------------------------------------------------------------
        self.decoder = nn.Sequential(conv(2 * c + extra, c), conv(c, c), nn.Conv2d(c, 2, 1))

    def forward(self, query_img, support_imgs, support_masks):
        B, K = support_imgs.shape[:2]
        q = self.encoder(query_img)                                      # [B, C, h, w]
        s = self.encoder(support_imgs.flatten(0, 1)).unflatten(0, (B, K))  # [B, K, C, h, w]
        m = DF.prepare_mask(support_masks, s.shape[-2:])                 # [B, K, h, w], 255 -> 0
        proto = DF.masked_average_pool(s, m).mean(1)                     # [B, C]
        x = [q, proto[:, :, None, None].expand_as(q)]
        if self.dcm is not None:
            x += list(self.dcm(q, s, support_masks))                     # 3 × [B, C, h, w]
        logits = self.decoder(torch.cat(x, 1))
        return F.interpolate(logits, size=query_img.shape[-2:], mode="bilinear", align_corners=True)


def run(use_dcm: bool, iters: int, size: int, seed: int = 0, episodes: int = 300):
    """Train ``TinyHost`` for ``iters`` iterations and return its :class:`benchmarks.EvaluationResult`."""
    from torch.utils.data import DataLoader

    from benchmarks import Protocol, build_dataset, collate_episodes, dataset_factory, evaluate

    torch.manual_seed(seed)
    model = TinyHost(use_dcm=use_dcm)
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=300, help="training iterations per model (batch 8)")
    p.add_argument("--size", type=int, default=64, help="synthetic image size")
    p.add_argument("--episodes", type=int, default=300, help="test episodes (held-out classes)")
    args = p.parse_args(argv)
    rows = []
    for use_dcm in (False, True):
        t0 = time.perf_counter()
        r = run(use_dcm, args.iters, args.size, episodes=args.episodes)
        rows.append(("TinyHost + DCM" if use_dcm else "TinyHost", r, time.perf_counter() - t0))
    print(f"\n{rows[0][1].protocol.describe()}")
    print(f"{'':16}{'mIoU':>8}{'FB-IoU':>8}{'time':>8}")
    for name, r, secs in rows:
        print(f"{name:16}{r.miou:8.2f}{r.fbiou:8.2f}{secs:7.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
