"""Speed of the dcm ops (and of DPCN / PFENet) next to the paper-literal and common formulations.

For every op and direction (forward, forward+backward) this measures, in one run on one device,

* ``literal``: the paper's text transcribed (:mod:`dcm.reference`: per-sample loops, ``unfold`` and
  the full ``dh·dw × HsWs × HqWq`` correlation of SAM);
* ``common``: what code usually does (SAM: unfold + one GEMM per window; DCM: one grouped
  convolution with ``groups = B·C`` per kernel; pooling: the eager pooling-matrix ``bmm``);
* ``ours``: dcm with its default backend (``"auto"``: on CUDA the Triton kernel of each op whose source
  has a passing record in ``dcm/kernels/verified.json``, PyTorch otherwise; PyTorch on CPU), and
  ``ours-torch``: dcm's pure-PyTorch path;

with the time (median; CUDA events via ``triton.testing.do_bench`` on GPU, which includes any
host-side launch overhead that the GPU waits for), for ``ours`` also the time per call replayed from
a CUDA graph (GPU time without launch overhead, as under CUDA graphs / ``torch.compile``), the extra peak memory
over the inputs, the ratio to ``ours``, and the physical floor of the shapes: the fewest bytes
(each input read once, each output written once) at the copy bandwidth measured in the same run,
and the FLOPs at the bf16 GEMM rate measured in the same run (×3 for the float32-accurate bf16x3
Gram of SAM). ``--dtype bfloat16`` / ``float16`` runs the ops on inputs of that dtype under CUDA
autocast of that dtype; ``float32`` runs them without autocast.

Usage (from the repository root)::

    python benchmarks/speed.py                          # CUDA defaults: B=8, 60×60, C=256 / 2048
    python benchmarks/speed.py --dtype bfloat16 --ops sam,dynconv --json speed.json
    python benchmarks/speed.py --device cpu --batch 1 --size 8   # tiny CPU smoke run
    python benchmarks/speed.py --ops models              # DPCN, PFENet±DCM, CANet±DCM: train step + 1-shot inference
    python benchmarks/speed.py --ops dynconv --sweep DW_ROWS=1,2,4   # time launch configurations

``--sweep NAME=v1,v2,...`` (repeatable; every combination) runs the selected ops once per
configuration of the kernel knobs of :data:`dcm.kernels.KNOBS` (each in a fresh process with
``DCM_<NAME>`` set), times only ``ours``, and prints one table with a column per configuration.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dcm  # noqa: E402
import dcm.functional as DF  # noqa: E402
from dcm import reference as R  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALL_OPS = ("sam", "dynconv", "fgpool", "ffm", "models")
WIN3 = ((5, 1), (3, 3), (1, 5))


# ------------------------------------------------------------------------------------ measuring
class Bench:
    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.cuda = device.type == "cuda"
        self.quick = quick

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of ``fn`` (warmed up)."""
        if self.cuda:
            import triton.testing

            warm, rep = (5, 20) if self.quick else (25, 100)
            return float(triton.testing.do_bench(fn, warmup=warm, rep=rep, return_mode="median"))
        fn()
        times = []
        budget = 0.2 if self.quick else 1.0
        t_end = time.perf_counter() + budget
        while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return times[len(times) // 2]

    def peak_mb(self, fn: Callable[[], object]) -> Optional[float]:
        """Extra peak memory (MB) of one call over what was allocated before it."""
        if not self.cuda:
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20

    def graph_ms(self, fn: Callable[[], object], n: int = 10) -> Optional[float]:
        """Milliseconds per call when ``n`` calls are replayed from one CUDA graph (no launch overhead)."""
        if not self.cuda:
            return None
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                fn()
        ms = self.time_ms(g.replay) / n
        del g
        return ms

    def bandwidth(self) -> float:
        """Device-to-device copy rate in bytes/s, counting read + write."""
        n = (256 if self.cuda else 16) * 2**20 // 4
        a = torch.empty(n, device=self.device, dtype=torch.float32).uniform_()
        b = torch.empty_like(a)
        ms = self.time_ms(lambda: b.copy_(a))
        return 2 * a.numel() * 4 / (ms * 1e-3)

    def gemm_rate(self) -> float:
        """bf16 (CUDA) / float32 (CPU) GEMM FLOP/s on a large square product."""
        n = 8192 if self.cuda else 512
        dt = torch.bfloat16 if self.cuda else torch.float32
        a = torch.randn(n, n, device=self.device, dtype=dt)
        b = torch.randn(n, n, device=self.device, dtype=dt)
        ms = self.time_ms(lambda: a @ b)
        return 2 * n**3 / (ms * 1e-3)


def _grad_fn(fn: Callable[[], object], inputs: List[torch.Tensor]):
    def run():
        out = fn()
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if torch.is_tensor(o) and o.requires_grad]
        loss = sum((o.float() * 1e-3).sum() for o in outs)
        return torch.autograd.grad(loss, inputs, allow_unused=True)

    return run


def _fmt_ms(v):
    if v is None:
        return "-"
    return f"{v:9.3f}" if v < 100 else f"{v:9.1f}"


# ------------------------------------------------------------------------------------ the ops
def _sam_unfold(q, s, m, windows, eps=1e-7):
    """Common SAM: normalise, unfold each map per window, one GEMM per window, masked max."""
    B, C, Hq, Wq = q.shape
    K, Hs, Ws = s.shape[1], s.shape[3], s.shape[4]
    mm = DF.prepare_mask(m, (Hs, Ws), dtype=torch.float32)
    w, empty = DF.shot_weights(mm)
    mm = torch.where(empty[:, None, None, None], torch.ones_like(mm), mm)
    sh = F.normalize(s.float() * mm[:, :, None], dim=2, eps=eps).flatten(0, 1)
    qh = F.normalize(q.float(), dim=1, eps=eps)
    maps = []
    for dh, dw in windows:
        pad = (dh // 2, dw // 2)
        us = F.unfold(sh, (dh, dw), padding=pad)  # [B·K, C·n, HsWs]
        uq = F.unfold(qh, (dh, dw), padding=pad).repeat_interleave(K, 0)  # [B·K, C·n, HqWq]
        corr = torch.bmm(us.transpose(1, 2), uq) / (dh * dw)
        a = corr.amax(1).reshape(B, K, Hq, Wq)
        maps.append(DF.normalize_minmax(a, eps))
    return (torch.stack(maps, 2) * w[:, :, None, None, None]).sum(1)


def _on(dev, fn, *args):
    """Run a dcm.reference function with ``dev`` as the default device (it allocates with torch.zeros)."""
    with torch.device(dev), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


def _sam_literal(q, s, m, windows):
    return _on(q.device, R.support_activation_literal, q, s, m, windows)


def _literal_dynconv(x, ws):
    return tuple(R.dynamic_conv_loop(x, w) for w in ws)


def op_sam(bench: Bench, a, dtype, B, K, size, C, add):
    dev = bench.device
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, C, size, size, device=dev, generator=g).relu().to(dtype)
    s = torch.randn(B, K, C, size, size, device=dev, generator=g).relu().to(dtype)
    m = (torch.rand(B, K, size * 8, size * 8, device=dev, generator=g) < 0.3).float()
    hw = size * size
    elt = torch.finfo(dtype).bits // 8
    flops = 2.0 * B * K * hw * hw * C * (3 if dtype == torch.float32 else 1)
    nbytes = (q.numel() + s.numel()) * elt + B * 3 * hw * 4
    floor = max(nbytes / a.bw, flops / a.gemm) * 1e3
    fl_note = f"Gram GEMM {flops / 1e9:.0f} GFLOP{' (bf16x3)' if dtype == torch.float32 else ''}"
    variants = {
        "ours": lambda: DF.support_activation(q, s, m, WIN3),
        "ours-torch": lambda: _with_backend("torch", DF.support_activation, q, s, m, WIN3),
        "common": lambda: _sam_unfold(q, s, m, WIN3),
    }
    # literal: B·K·nW loops, each materialising [dh·dw, HsWs, HqWq]; subsample the batch if large
    lit_b = B
    per = 9 * hw * hw * 4 * 3
    if bench.cuda:
        free = torch.cuda.mem_get_info(dev)[0]
        while lit_b > 1 and per * 2 > free:
            lit_b //= 2
        if per * 2 > free:
            lit_b = 0
    elif hw > 400:
        lit_b = 0
    if lit_b:
        variants["literal"] = lambda: _sam_literal(q[:lit_b], s[:lit_b], m[:lit_b], WIN3)
    note = f"literal on {lit_b} of {B} samples, scaled ×{B / lit_b:g}" if lit_b and lit_b != B else ""
    run_op(bench, a, add, "support_activation", variants, [q, s], floor, fl_note, scale={"literal": (B / lit_b) if lit_b else 1}, note=note)


def _with_backend(name, fn, *args):
    with dcm.use_backend(name):
        return fn(*args)


def op_dynconv(bench: Bench, a, dtype, B, size, C, add):
    dev = bench.device
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(B, C, size, size, device=dev, generator=g).to(dtype)
    ws = [(torch.randn(B, C, *k, device=dev, generator=g) / k[0]).to(dtype) for k in ((5, 1), (1, 5), (5, 5))]
    elt = torch.finfo(dtype).bits // 8
    nbytes = 4 * x.numel() * elt
    floor = nbytes / a.bw * 1e3
    variants = {
        "ours": lambda: DF.dynamic_depthwise_conv2d_multi(x, ws),
        "common": lambda: _with_backend("torch", DF.dynamic_depthwise_conv2d_multi, x, ws),
    }
    lit_b = B if (bench.cuda or B * C <= 64) else 1
    lit_c = C if bench.cuda else min(C, 16)
    if bench.cuda:
        lit_b = 1  # B·C·3 separate conv launches per sample: time one sample, scale by B
    variants["literal"] = lambda: _literal_dynconv(x[:lit_b, :lit_c], [w[:lit_b, :lit_c] for w in ws])
    scale = (B / lit_b) * (C / lit_c)
    run_op(bench, a, add, "dynamic_conv ×3 (5×1,1×5,5×5)", variants, [x] + ws, floor, "read x once, write 3 outputs",
           scale={"literal": scale}, note=f"literal: per-(b,c) loop on {lit_b}×{lit_c} planes, scaled ×{scale:g}" if scale != 1 else "")


def op_fgpool(bench: Bench, a, dtype, B, K, size, C, add):
    dev = bench.device
    for b in ((B, 32) if bench.cuda and B != 32 else (B,)):
        g = torch.Generator(device=dev).manual_seed(2)
        f = torch.randn(b, K, C, size, size, device=dev, generator=g).to(dtype)
        m = (torch.rand(b, K, size * 8, size * 8, device=dev, generator=g) < 0.3).float()
        m[0] = 0
        elt = torch.finfo(dtype).bits // 8
        # the features once, the 4 bilinear source pixels of each feature position (not the whole
        # full-resolution mask: dcm's kernel reads only those), the outputs
        nbytes = f.numel() * elt + b * K * size * size * 4 * 4 + b * C * 30 * elt
        floor = nbytes / a.bw * 1e3
        variants = {
            "ours": lambda f=f, m=m: DF.foreground_pool(f, m, (5, 25)),
            "ours-torch": lambda f=f, m=m: _with_backend("torch", DF.foreground_pool, f, m, (5, 25)),
            "literal": lambda f=f, m=m: _on(f.device, R.foreground_pool_loop, f, m, (5, 25)),
        }
        run_op(bench, a, add, f"foreground pool S=5,25 B={b}", variants, [f], floor, "read feat + 4 mask taps per position")


def op_ffm(bench: Bench, a, dtype, B, K, size, C, add):
    dev = bench.device
    g = torch.Generator(device=dev).manual_seed(3)
    q = torch.randn(B, C, size, size, device=dev, generator=g).to(dtype)
    s = torch.randn(B, K, C, size, size, device=dev, generator=g).to(dtype)
    m = (torch.rand(B, K, size * 8, size * 8, device=dev, generator=g) < 0.3).float()
    pm = torch.rand(B, 1, size, size, device=dev, generator=g).to(dtype)
    ffm = dcm.FeatureFiltering(C).to(dev)
    elt = torch.finfo(dtype).bits // 8
    nbytes = (2 * q.numel() + s.numel()) * elt
    floor = nbytes / a.bw * 1e3
    w, b = ffm.conv.weight, ffm.conv.bias
    variants = {
        "ours": lambda: ffm(q, s, m, pm),
        "literal": lambda: _on(dev, R.feature_filtering_literal, q.float(), s.float(), m, pm.float(), w, b),
    }
    run_op(bench, a, add, "feature filtering", variants, [q, s], floor, "read q, s once, write x̃_q")


def run_op(bench, a, add, name, variants, inputs, floor, floor_note, scale=None, note=""):
    scale = scale or {}
    ctx = a.ctx
    if a.variants is not None:
        variants = {k: v for k, v in variants.items() if k in a.variants}
    for mode in ("fwd", "fwd+bwd"):
        rows = {}
        for vname, fn in variants.items():
            if mode == "fwd+bwd":
                leaves = [t.requires_grad_() for t in inputs if t.is_floating_point()]
                call = _grad_fn(lambda fn=fn: _in(ctx, fn), leaves)
            else:
                call = lambda fn=fn: _in(ctx, torch.no_grad, fn)  # noqa: E731
            try:
                ms = bench.time_ms(call) * scale.get(vname, 1.0)
                mem = bench.peak_mb(call)
                gms = None
                if vname.startswith("ours") and bench.cuda:
                    try:
                        gms = bench.graph_ms(call)
                    except Exception:  # noqa: BLE001 - not capturable: leave the column empty
                        torch.cuda.synchronize()
                rows[vname] = (ms, mem, "", gms)
            except Exception as e:  # noqa: BLE001 - report and continue
                rows[vname] = (None, None, f"failed: {type(e).__name__}: {str(e)[:120]}", None)
            finally:
                for t in inputs:
                    t.requires_grad_(False)
                    t.grad = None
        ours = rows.get("ours", (None,))[0]
        for vname, (ms, mem, err, gms) in rows.items():
            add(dict(
                op=name, mode=mode, variant=vname, ms=ms, graph_ms=gms, peak_mb=mem,
                x_vs_ours=(ms / ours) if (ms and ours) else None,
                floor_ms=floor if mode == "fwd" else None, floor=floor_note,
                note="; ".join(t for t in (err, note if vname == "literal" else "") if t),
            ))


def _in(ctx, *fns):
    if len(fns) == 2:
        with ctx(), fns[0]():
            return fns[1]()
    with ctx():
        return fns[0]()


# ------------------------------------------------------------------------------------ models
#: The networks of ``--ops models`` (registry name, DCM fields changed from the model's default), ResNet-50:
#: DPCN, PFENet and CANet, each host with its default DCM and with the DCM on the other input (the raw
#: input's kernel generators grow with the square of the backbone feature's channels, 1536 on ResNet-50).
MODEL_ROWS = (("dpcn", {}), ("pfenet", {}), ("pfenet+dcm", {}), ("pfenet+dcm", {"input": "raw"}),
              ("canet", {}), ("canet+dcm", {}), ("canet+dcm", {"input": "reduced"}))


def op_models(bench: Bench, a, dtype, B, K, add):
    try:
        import models.registry as registry
    except Exception as e:  # noqa: BLE001
        print(f"[models] skipped: cannot import models.registry ({type(e).__name__}: {e})")
        add(dict(op="models", mode="-", variant="-", ms=None, peak_mb=None, note=f"skipped: {e}"))
        return
    dev = bench.device
    size = 473 if bench.cuda else 65
    for name, fields in MODEL_ROWS:
        label = name + "".join(f" {k}={v}" for k, v in fields.items())
        try:
            net = registry.build_model(name, backbone="resnet50", shot=K, backbone_weights="random",
                                       **({"dcm": fields} if fields else {})).to(dev)
        except Exception as e:  # noqa: BLE001
            print(f"[models] {label}: build failed ({type(e).__name__}: {e})")
            add(dict(op=f"model {label}", mode="-", variant="-", ms=None, peak_mb=None, note=f"build failed: {e}"))
            continue
        n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
        g = torch.Generator(device=dev).manual_seed(4)
        qi = torch.randn(B, 3, size, size, device=dev, generator=g)
        si = torch.randn(B, K, 3, size, size, device=dev, generator=g)
        sm = (torch.rand(B, K, size, size, device=dev, generator=g) < 0.3).long()
        qm = (torch.rand(B, size, size, device=dev, generator=g) < 0.3).long()
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9)

        def train_step():
            net.train()
            with a.ctx():
                out = net(qi, si, sm, qm)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()

        def infer():
            net.eval()
            with torch.no_grad(), a.ctx():
                return net(qi, si[:, :1], sm[:, :1])["logits"]

        for mode, fn in (("train step", train_step), ("1-shot inference", infer)):
            for backend in ("auto", "torch"):
                try:
                    with dcm.use_backend(backend):
                        ms = bench.time_ms(fn)
                        mem = bench.peak_mb(fn)
                    add(dict(op=f"model {label} {size}² B={B} K={K}", mode=mode, variant="ours" if backend == "auto" else "ours-torch",
                             ms=ms, peak_mb=mem, note=f"{n_train:,} trainable parameters"))
                except Exception as e:  # noqa: BLE001
                    add(dict(op=f"model {label}", mode=mode, variant=backend, ms=None, peak_mb=None, note=f"failed: {type(e).__name__}: {str(e)[:160]}"))
        del net, opt
        if bench.cuda:
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=None, help="default 8 on CUDA, 2 on CPU")
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--size", type=int, default=None, help="feature map side (default 60 on CUDA, 12 on CPU)")
    p.add_argument("--channels", type=int, default=None, help="mid-level C (default 256 on CUDA, 16 on CPU)")
    p.add_argument("--channels-high", type=int, default=None, help="high-level C of SAM (default 2048 on CUDA, 32 on CPU)")
    p.add_argument("--ops", default="sam,dynconv,fgpool,ffm", help=f"comma list of {','.join(ALL_OPS)}")
    p.add_argument("--json", default=None, help="write all rows here")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--variants", default=None, help="comma list of variants to time (default: all)")
    p.add_argument("--sweep", action="append", default=[], metavar="NAME=v1,v2",
                   help="time ours under each value of a dcm.kernels knob (repeatable: every combination)")
    args = p.parse_args(argv)
    if args.sweep:
        return sweep(p, args, argv if argv is not None else sys.argv[1:])

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    B = args.batch or (8 if cuda else 2)
    size = args.size or (60 if cuda else 12)
    C = args.channels or (256 if cuda else 16)
    Ch = args.channels_high or (2048 if cuda else 32)
    K = args.shots
    dtype = DTYPES[args.dtype]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in ALL_OPS]
    if bad:
        p.error(f"unknown ops {bad}; choose from {ALL_OPS}")
    if dtype != torch.float32 and not cuda:
        dtype = torch.float32
        print("[speed] CPU run: --dtype ignored, using float32")

    bench = Bench(dev, args.quick or not cuda)
    dcm.set_data_checks(False)  # value checks synchronise; a training loop turns them off too

    class A:
        pass

    a = A()
    a.variants = {v.strip() for v in args.variants.split(",") if v.strip()} if args.variants else None
    a.bw = bench.bandwidth()
    a.gemm = bench.gemm_rate()
    a.ctx = (lambda: torch.autocast("cuda", dtype=dtype)) if (cuda and dtype != torch.float32) else contextlib.nullcontext
    env = dict(
        device=torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
        torch=torch.__version__, triton=_triton_version(), dtype=args.dtype,
        autocast=bool(cuda and dtype != torch.float32), batch=B, shots=K, size=size, channels=C, channels_high=Ch,
        copy_bandwidth_GBps=a.bw / 1e9, gemm_TFLOPs=a.gemm / 1e12,
        backend_ours=(", ".join(f"{op} {r['path']}" for op, r in dcm.backend_report("cuda").items())
                      if cuda else "torch"),
    )
    print("[speed] " + ", ".join(f"{k}={(f'{v:.1f}' if isinstance(v, float) else v)}" for k, v in env.items()))
    rows: List[Dict] = []
    add = rows.append
    for op in ops:
        t0 = time.perf_counter()
        if op == "sam":
            op_sam(bench, a, dtype, B, K, size, Ch, add)
        elif op == "dynconv":
            op_dynconv(bench, a, dtype, B, size, C, add)
        elif op == "fgpool":
            op_fgpool(bench, a, dtype, B, K, size, C, add)
        elif op == "ffm":
            op_ffm(bench, a, dtype, B, K, size, C, add)
        elif op == "models":
            op_models(bench, a, dtype, B, K, add)
        print(f"[speed] {op}: {time.perf_counter() - t0:.1f} s", flush=True)
    _table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        print(f"[speed] wrote {args.json}")
    return rows


def _parse_sweep(p, specs):
    """``["DW_ROWS=1,2", ...]`` -> [(name, [values])], each name a knob of dcm.kernels.KNOBS."""
    from dcm.kernels import KNOBS

    out = []
    for spec in specs:
        name, _, vals = spec.partition("=")
        name = name.strip().upper().removeprefix("DCM_")
        if name not in KNOBS:
            p.error(f"--sweep {spec!r}: unknown knob {name!r}; choose from {sorted(KNOBS)}")
        try:
            values = [int(v) for v in vals.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values:
            p.error(f"--sweep {spec!r}: expected NAME=v1,v2,... with integer values")
        out.append((name, values))
    return out


def _without(argv, flags):
    """``argv`` without the options in ``flags`` (and their values)."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        name = tok.split("=", 1)[0]
        if name in flags:
            skip = "=" not in tok
            continue
        out.append(tok)
    return out


def sweep(p, args, argv):
    """Run this script once per knob configuration (fresh process, ``DCM_<NAME>`` set), ``ours`` only,
    and print the times side by side; ``--json`` gets every run's rows. Exits non-zero (after the
    table) when a configuration failed."""
    import itertools
    import os
    import subprocess
    import tempfile

    knobs = _parse_sweep(p, args.sweep)
    base = _without(argv, {"--sweep", "--json", "--variants"}) + ["--variants", args.variants or "ours"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, combo in enumerate(itertools.product(*[v for _, v in knobs])):
            cfg = {name: v for (name, _), v in zip(knobs, combo)}
            label = " ".join(f"{k}={v}" for k, v in cfg.items())
            out = Path(tmp) / f"run{i}.json"
            env = dict(os.environ, **{f"DCM_{k}": str(v) for k, v in cfg.items()})
            print(f"[speed] sweep: {label}", flush=True)
            res = subprocess.run([sys.executable, str(Path(__file__).resolve())] + base + ["--json", str(out)], env=env)
            if res.returncode != 0 or not out.exists():
                print(f"[speed] sweep: {label} failed (exit {res.returncode})", flush=True)
                runs.append(dict(config=cfg, label=label, env=None, rows=[]))
                continue
            data = json.loads(out.read_text())
            runs.append(dict(config=cfg, label=label, env=data["env"], rows=data["rows"]))
    _sweep_table(runs)
    if args.json:
        Path(args.json).write_text(json.dumps({"sweep": runs}, indent=1))
        print(f"[speed] wrote {args.json}")
    failed = [r["label"] for r in runs if r["env"] is None]
    if failed:
        sys.exit(f"[speed] sweep: {len(failed)} of {len(runs)} configurations failed: {', '.join(failed)}")
    return runs


def _sweep_table(runs):
    """One line per (op, mode, variant), one column per configuration: ``eager / graph`` ms, the fastest
    (graph time where there is one) marked with ``*``."""
    keys = []
    for r in runs:
        for row in r["rows"]:
            k = (row["op"], row["mode"], row["variant"])
            if k not in keys:
                keys.append(k)
    width = max([24] + [len(r["label"]) for r in runs])
    print(f"{'op':38s} {'mode':8s} {'variant':10s} " + " ".join(f"{r['label']:>{width}s}" for r in runs))
    for k in keys:
        cells = []
        for r in runs:
            row = next((x for x in r["rows"] if (x["op"], x["mode"], x["variant"]) == k), None)
            t = None if row is None else (row.get("graph_ms") or row.get("ms"))
            cells.append((row, t))
        best = min((t for _, t in cells if t), default=None)
        line = []
        for row, t in cells:
            if row is None or row.get("ms") is None:
                line.append(f"{'-':>{width}s}")
                continue
            txt = f"{row['ms']:.4f}" + (f" / {row['graph_ms']:.4f}" if row.get("graph_ms") else "") + ("*" if t == best else " ")
            line.append(f"{txt:>{width}s}")
        print(f"{k[0][:38]:38s} {k[1][:8]:8s} {k[2][:10]:10s} " + " ".join(line))


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def _kernels():
    from dcm import kernels

    return kernels.available()


def _table(rows):
    head = f"{'op':38s} {'mode':16s} {'variant':14s} {'ms':>9s} {'graph ms':>9s} {'peak MB':>9s} {'×ours':>7s} {'floor ms':>9s}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        x = r.get("x_vs_ours")
        mem = r.get("peak_mb")
        print(
            f"{r['op'][:38]:38s} {r['mode'][:16]:16s} {r['variant'][:14]:14s} {_fmt_ms(r.get('ms'))} {_fmt_ms(r.get('graph_ms'))} "
            f"{(f'{mem:9.1f}' if mem is not None else '        -')} {(f'{x:7.2f}' if x else '      -')} "
            f"{_fmt_ms(r.get('floor_ms'))}  {r.get('note', '')}"
        )


if __name__ == "__main__":
    main()
