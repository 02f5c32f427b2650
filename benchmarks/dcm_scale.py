"""Scale of the DCM outputs at initialisation: RMS of the query feature a host fuses with and of each
dynamic-convolution output, per kernel normalisation, on real episodes.

    python benchmarks/dcm_scale.py --config plug_in_pfenet_voc_lite0 --data-root VOC2012 --episodes 32

Builds ``<host>+dcm`` of the recipe (seeded, train mode as in the first training step), runs it on
``--episodes`` training episodes and records, through a forward hook on the DCM, the RMS of its query
input and of each of its outputs; prints one line per ``kernel_norm`` and writes ``--json``.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402

from benchmarks.engine.config import ConfigError, add_config_args, load_config, overrides_from_args  # noqa: E402


def measure(cfg: dict, kernel_norm, episodes: int, batch: int = 8) -> dict:
    from benchmarks.datasets import collate_episodes
    from benchmarks.engine import build_model_from_config, build_train_dataset, seed_everything
    cfg = json.loads(json.dumps(cfg))
    name = cfg["model"]["name"]
    if "+dcm" not in name and name != "dpcn":
        cfg["model"]["name"] = name = name + "+dcm"
    dcm = cfg["model"].get("dcm")
    cfg["model"]["dcm"] = {**(dcm if isinstance(dcm, dict) else {"preset": dcm or "default"}), "kernel_norm": kernel_norm}
    seed_everything(int(cfg["train"]["seed"]))
    model = build_model_from_config(cfg).train()
    ds = build_train_dataset(cfg)
    ds.set_epoch(0)
    sums = {"query": 0.0}
    count = {"query": 0}

    def hook(mod, args, outs):
        q = args[0].detach().double()
        sums["query"] += float((q ** 2).sum())
        count["query"] += q.numel()
        for v, o in zip(mod.variants, outs):
            o = o.detach().double()
            sums[v] = sums.get(v, 0.0) + float((o ** 2).sum())
            count[v] = count.get(v, 0) + o.numel()

    model.dcm.register_forward_hook(hook)
    n = 0
    with torch.no_grad():
        while n < episodes:
            b = collate_episodes([ds[i] for i in range(n, min(n + batch, episodes))])
            model(b["query_img"], b["support_imgs"], b["support_masks"])
            n += b["query_img"].shape[0]
    return {k: math.sqrt(sums[k] / count[k]) for k in sums}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p, include=["data_root", "seed"])
    p.add_argument("--episodes", type=int, default=32)
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error("--episodes: expected >= 1")
    try:
        cfg = load_config(args.config or "plug_in_pfenet_voc_lite0", overrides_from_args(args))
        rows = {str(kn): measure(cfg, kn, args.episodes) for kn in (None, "l1", "l2")}
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = cfg["model"]["name"] if cfg["model"]["name"] in ("dpcn",) or "+dcm" in cfg["model"]["name"] else cfg["model"]["name"] + "+dcm"
    print(f"RMS at initialisation over {args.episodes} training episodes of {name} "
          f"(fold {cfg['data']['fold']}, seed {cfg['train']['seed']}, train mode)")
    for kn, r in rows.items():
        print(f"kernel_norm={kn:5}  query {r['query']:.3f}  " + "  ".join(f"{v} {r[v]:.3f}" for v in r if v != "query"))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"config": args.config, "episodes": args.episodes,
                                                       "fold": cfg["data"]["fold"], "seed": cfg["train"]["seed"],
                                                       "rms": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
