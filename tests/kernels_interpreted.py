"""The Triton kernels of ``dcm.kernels`` run by Triton's CPU interpreter, against float64 references.

Not collected by the normal test run (the file name does not start with ``test_``):
``tests/test_kernels_interpreter.py`` runs it in a subprocess with ``TRITON_INTERPRET=1`` (which must
be set before Triton is imported) so that CPU-only CI exercises every kernel -- forward and backward
of the dynamic convolution (rolling-row and tile paths), the support-activation window / gradient /
normalisation kernels and foreground selection + pooling -- on tiny shapes, and the custom ops that
``torch.compile`` traces (``aot_eager``: fake implementations, registered autograd). The interpreter
checks indexing, masking and arithmetic, not speed or GPU-only behaviour (CUDA graphs, Inductor,
tensor-core precision; its ``tl.dot`` on bfloat16 operands is wrong, so no kernel feeds it bf16): that
is ``tests/test_kernels_cuda.py`` on a GPU, and ``tests/test_kernels_compile.py`` for compiling.

Run by hand: ``TRITON_INTERPRET=1 python -m pytest -q tests/kernels_interpreted.py``.
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("needs TRITON_INTERPRET=1 set before Triton is imported (run via tests/test_kernels_interpreter.py)",
                allow_module_level=True)

import dcm  # noqa: E402
import dcm.functional as DF  # noqa: E402
from dcm import kernels  # noqa: E402

D = torch.float64


@pytest.fixture(autouse=True)
def _triton_backend():
    assert kernels.interpreted(), "Triton interpreter on, but dcm.kernels did not import"
    torch.set_num_threads(1)
    dcm.set_backend("triton")
    yield
    dcm.set_backend("auto")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def leaf(t):
    return t.detach().clone().requires_grad_()


def run(fn, *args, backend, grads=None):
    """``fn(*args)`` under ``backend`` -> (outputs tuple, input gradients tuple or None)."""
    with dcm.use_backend(backend):
        out = fn(*args)
    out = out if isinstance(out, tuple) else (out,)
    if grads is None:
        return out, None
    ins = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return out, torch.autograd.grad(out, ins, [g.to(o.dtype) for g, o in zip(grads, out)], allow_unused=True)


def maxabs(a, b):
    return (a.double() - b.double()).abs().max().item()


def compare(fn, args, *, tol, gtol=None, metric=rel):
    """Triton (interpreted) on ``args`` against the torch backend on float64 copies: outputs within
    ``tol`` (``metric``: relative norm, or ``maxabs``), input gradients within ``gtol`` (relative norm)."""
    got, _ = run(fn, *args, backend="triton")
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(o.shape, generator=g, dtype=D) for o in got]
    got, ggot = run(fn, *args, backend="triton", grads=grads if gtol else None)
    ref_args = [leaf(a.double()) if isinstance(a, torch.Tensor) and a.requires_grad
                else (a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a) for a in args]
    ref, gref = run(fn, *ref_args, backend="torch", grads=grads if gtol else None)
    assert len(got) == len(ref)
    for o, r in zip(got, ref):
        assert o.shape == r.shape and torch.isfinite(o).all()
        assert metric(o, r) < tol, (metric(o, r), tol)
    for a, b in zip(ggot or (), gref or ()):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel(a, b) < gtol, (rel(a, b), gtol)


# ---------------------------------------------------------------------------------- dynamic convolution
KSETS = {"vhs5": [(5, 1), (1, 5), (5, 5)],   # rolling-row kernels, 3 sets in one launch
         "four": [(5, 5), (1, 5), (5, 1), (3, 3)],  # two launches, other slot order
         "big": [(9, 9), (7, 3)]}             # 2-D tile kernels (larger than 5x5)


DW_CASES = [("vhs5", (2, 3, 7, 9)), ("vhs5", (1, 2, 1, 1)), ("vhs5", (2, 2, 6, 5)),
            ("four", (2, 3, 7, 9)), ("four", (1, 2, 3, 2)),
            ("big", (1, 2, 1, 1)), ("big", (1, 2, 5, 4))]  # the tile kernels are slow to interpret


@pytest.mark.parametrize("kset, shape", DW_CASES)
def test_dynamic_conv_fp32(shape, kset):
    g = torch.Generator().manual_seed(0)
    B, C, H, W = shape
    x = torch.randn(shape, generator=g).requires_grad_()
    ws = [(torch.randn(B, C, *k, generator=g) / k[0]).requires_grad_() for k in KSETS[kset]]
    compare(lambda x, *ws: DF.dynamic_depthwise_conv2d_multi(x, list(ws)), [x, *ws], tol=1e-5, gtol=2e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("kset, shape, programs", [("vhs5", (1, 2, 17, 9), 10**6), ("four", (2, 1, 11, 6), 10**6),
                                                   ("vhs5", (1, 1, 3, 5), 1)])
def test_dynamic_conv_rows_per_step(monkeypatch, rows, kset, shape, programs):
    """The rolling kernels load ``ROWS`` input rows per step (``DCM_DW_ROWS``): every value, with row
    chunks that are not multiples of it (several chunks per plane, the ``dx`` accumulation of a second
    launch, fewer rows than one step)."""
    from dcm.kernels import dynamic_conv as K

    monkeypatch.setattr(K, "_ROWS", rows)
    monkeypatch.setattr(K, "_TARGET_PROGRAMS", programs)
    K._roll_cfg.cache_clear()
    try:
        B, C, H, W = shape
        assert (K._roll_cfg(B * C, H, W)[-1] > 1) == (programs > 1)  # several row chunks per plane, or one
        g = torch.Generator().manual_seed(rows)
        x = torch.randn(shape, generator=g).requires_grad_()
        ws = [(torch.randn(B, C, *k, generator=g) / k[0]).requires_grad_() for k in KSETS[kset]]
        compare(lambda x, *ws: DF.dynamic_depthwise_conv2d_multi(x, list(ws)), [x, *ws], tol=1e-5, gtol=2e-5)
    finally:
        K._roll_cfg.cache_clear()


def test_dynamic_conv_bf16_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 7, generator=g).bfloat16().requires_grad_()
    ws = [torch.randn(2, 3, *k, generator=g).bfloat16().requires_grad_() for k in KSETS["vhs5"]]
    compare(lambda x, *ws: DF.dynamic_depthwise_conv2d_multi(x, list(ws)), [x, *ws], tol=1e-2, gtol=2e-2)


def test_dynamic_conv_noncontiguous_input():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 8, 3, generator=g).permute(0, 3, 2, 1)  # [2, 3, 8, 6], channels-last strides
    ws = [torch.randn(2, 3, 5, 5, generator=g)]
    compare(lambda x, w: DF.dynamic_depthwise_conv2d_multi(x, [w]), [x, ws[0]], tol=1e-5)


# ---------------------------------------------------------------------------------- support activation
@pytest.mark.parametrize("windows", [((5, 1), (3, 3), (1, 5)), ((1, 1),)])
@pytest.mark.parametrize("K, Hq, Wq, Hs, Ws", [(1, 6, 7, 6, 7), (2, 5, 4, 7, 3)])
def test_support_activation_fp32(windows, K, Hq, Wq, Hs, Ws):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 16, Hq, Wq, generator=g).requires_grad_()
    s = torch.randn(2, K, 16, Hs, Ws, generator=g).requires_grad_()
    m = (torch.rand(2, K, 3 * Hs, 3 * Ws, generator=g) > 0.4).float()
    m[1, 0] = 0  # an empty shot
    # float32 mode = bf16x3 split Gram: raw activations within ~2e-5 (as on an H100, tests/test_kernels_cuda.py);
    # the per-image min-max normalisation divides by the map's range (0.2-0.5 with 16 channels)
    compare(lambda q, s, m: DF.support_activation(q, s, m, windows), [q, s, m], tol=1e-4, gtol=1e-4, metric=maxabs)


def test_support_activation_raw_unmasked():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 8, 5, 6, generator=g).requires_grad_()
    s = torch.randn(1, 2, 8, 4, 4, generator=g).requires_grad_()
    compare(lambda q, s: DF.support_activation_raw(q, s, ((3, 3), (1, 5))), [q, s], tol=2e-5, gtol=1e-4, metric=maxabs)


def test_support_activation_cpu_autocast_bf16():
    """Under (CPU) bf16 autocast the kernels use a single bf16 Gram, as under CUDA autocast."""
    g = torch.Generator().manual_seed(5)
    q, s = torch.randn(2, 32, 6, 6, generator=g), torch.randn(2, 1, 32, 6, 6, generator=g)
    m = (torch.rand(2, 1, 6, 6, generator=g) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = DF.support_activation(q, s, m)
    with dcm.use_backend("torch"):
        ref = DF.support_activation(q.double(), s.double(), m.double())
    assert (got.double() - ref).abs().max() < 3e-2


# ---------------------------------------------------------------------------------- foreground pooling
@pytest.mark.parametrize("bins", [(5, 25), (1, 2, 3, 4), (7,)])
@pytest.mark.parametrize("K, H, W", [(1, 6, 7), (2, 5, 5), (1, 2, 2)])
def test_foreground_pool_fp32(bins, K, H, W):
    g = torch.Generator().manual_seed(6)
    feat = torch.randn(3, K, 8, H, W, generator=g).requires_grad_()
    # masks at feature resolution with values away from the 0.5 threshold: the selection cannot
    # flip between float32 and float64
    m = torch.tensor([0.0, 0.2, 0.8, 1.0])[torch.randint(0, 4, (3, K, H, W), generator=g)]
    m[1] = 0.0                       # empty sample: peak fallback
    m[2] = 0.0
    m[2, 0, 0, 1] = 1.0              # a single foreground pixel (fewer than S)
    compare(lambda f, m: DF.foreground_pool(f, m, bins=bins), [feat, m], tol=1e-5, gtol=1e-5)


@pytest.mark.parametrize("bins, dtype", [((5, 25), torch.float32), ((3, 100), torch.float32), ((5, 25), torch.bfloat16),
                                         ((5, 25), torch.float16)])
def test_foreground_pool_chunks(bins, dtype):
    """Several position chunks per sample (partial sums added by the finishing kernel), the wide-bin
    block sizes (> 64 output columns) and half features: fp16 through the product in its own dtype
    (the GPU path of bf16 and fp16), bf16 converted to float32 first (the interpreter's bf16 tl.dot is
    wrong)."""
    from dcm.kernels import foreground as fk

    assert fk._half_dot(torch.empty(1, dtype=dtype)) == (dtype == torch.float16)  # CPU tensors

    B, K, C, H, W = 2, 2, 20, 13, 11
    NB, BC, BL, chunk, nsplit = fk._fwd_meta(B, C, K * H * W, bins, torch.device("cpu"), dtype == torch.float32)
    assert nsplit > 1 and chunk % BL == 0 and C % BC != 0  # the case this test is for
    g = torch.Generator().manual_seed(9)
    feat = torch.randn(B, K, C, H, W, generator=g).to(dtype).requires_grad_()
    m = torch.tensor([0.0, 0.3, 0.7, 1.0])[torch.randint(0, 4, (B, K, H, W), generator=g)]
    m[1, 0] = 0.0  # an empty shot next to a non-empty one
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    compare(lambda f, m: DF.foreground_pool(f, m, bins=bins), [feat, m], tol=tol, gtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_foreground_pool_several_blocks_per_chunk(monkeypatch, dtype):
    """Few programs (FG_SM_PROGRAMS = 1 on a pretend 16-SM device): each program adds several position
    blocks into its accumulator before writing its partial sums, and each sample has several chunks."""
    from dcm.kernels import foreground as fk

    monkeypatch.setattr(fk, "_SM_PROGRAMS", 1)
    monkeypatch.setattr(fk, "_sm_count", lambda device: 16)
    B, K, C, H, W = 3, 2, 40, 17, 13  # 3 samples x 2 channel blocks x 3 chunks of 3-5 blocks
    NB, BC, BL, chunk, nsplit = fk._fwd_meta(B, C, K * H * W, (5, 25), torch.device("cpu"), dtype == torch.float32)
    assert chunk >= 2 * BL and nsplit > 1, (chunk, BL, nsplit)
    g = torch.Generator().manual_seed(11)
    feat = torch.randn(B, K, C, H, W, generator=g).to(dtype).requires_grad_()
    m = torch.tensor([0.0, 0.3, 0.7, 1.0])[torch.randint(0, 4, (B, K, H, W), generator=g)]
    m[2] = 0.0  # no foreground: every position, in raster order
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    compare(lambda f, m: DF.foreground_pool(f, m, bins=(5, 25)), [feat, m], tol=tol, gtol=tol)


def _blob_masks(B, K, h, w, g):
    """Label masks {0, 1, 255} with rectangular objects and ignore pixels at ``h x w``."""
    m = torch.zeros(B, K, h, w, dtype=torch.uint8)
    for b in range(B):
        for k in range(K):
            y0, x0 = (int(torch.randint(0, max(1, n // 2), (1,), generator=g)) for n in (h, w))
            dy, dx = (int(torch.randint(1, max(2, n // 2), (1,), generator=g)) for n in (h, w))
            m[b, k, y0:y0 + dy, x0:x0 + dx] = 1
            m[b, k, y0 + dy:y0 + dy + 2, x0:x0 + dx] = 255  # ignore band next to the object
    m[torch.rand(m.shape, generator=g) < 0.15] = 255  # and scattered ignore pixels: every bilinear tap meets some
    return m


@pytest.mark.parametrize("mask_hw, feat_hw, dtype", [((37, 41), (7, 8), torch.uint8), ((53, 29), (8, 6), torch.float32),
                                                     ((4, 3), (10, 7), torch.bool), ((30, 1), (6, 1), torch.float64),
                                                     ((1, 25), (1, 6), torch.uint8)])
def test_foreground_pool_resizes_masks_in_kernel(mask_hw, feat_hw, dtype):
    """Masks at their own resolution (down- and upsampling, 1-pixel sides) and dtype, label 255: the
    selection kernel resizes them itself; against prepare_mask + selection + pooling in float64."""
    from dcm.functional.masks import prepare_mask

    g = torch.Generator().manual_seed(11)
    B, K, C = 3, 2, 8
    m = _blob_masks(B, K, *mask_hw, g)
    m[2, 1] = 0  # an empty shot
    m[2, 0] = 0
    m[2, 0, mask_hw[0] // 2, mask_hw[1] // 2] = 1  # one source pixel
    if dtype == torch.bool:
        m = m == 1
    m = m.to(dtype)
    if dtype.is_floating_point:
        m[2, 0] *= 0.375  # a soft mask below the threshold: the peak fallback
    ref = prepare_mask(m.double(), feat_hw)
    near = (ref - 0.5).abs().min().item()
    assert near > 1e-4, f"test masks put a resized value {near:g} from the threshold: pick another seed"
    feat = torch.randn(B, K, C, *feat_hw, generator=g).requires_grad_()
    compare(lambda f, m: DF.foreground_pool(f, m, bins=(5, 25)), [feat, m], tol=1e-5, gtol=1e-5)


def test_foreground_pool_custom_ops_under_torch_compile():
    """``torch.compile(fullgraph=True)`` traces the custom ops ``dcm::fg_select`` / ``dcm::fg_pool`` (fake
    implementations, registered autograd) instead of the eager autograd.Function: same outputs and
    gradients. ``aot_eager``: no C++ toolchain needed; the ops then run the interpreted kernels."""
    import torch._dynamo

    g = torch.Generator().manual_seed(12)
    feat = torch.randn(3, 2, 8, 7, 9, generator=g)
    m = _blob_masks(3, 2, 29, 33, g)
    m[1] = 0

    def fn(f, m):
        return DF.foreground_pool(f, m, bins=(5, 25))

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with dcm.use_backend("triton"):
        f1, f2 = leaf(feat), leaf(feat)
        eager, got = fn(f1, m), compiled(f2, m)
        gw = [torch.randn(o.shape, generator=g) for o in eager]
        ge = torch.autograd.grad(eager, f1, gw)[0]
        gg = torch.autograd.grad(got, f2, gw)[0]
    for a, b in zip(got, eager):
        assert torch.equal(a, b)
    assert torch.equal(gg, ge)


def _modules_pipeline(seed):
    """SAM -> FFM -> DCM on tiny random inputs: ``(pipeline, (q, s, qh, sh, m), modules)``."""
    torch.manual_seed(0)
    dcm_mod, sam, ffm = dcm.DynamicConvModule(8), dcm.SupportActivation(), dcm.FeatureFiltering(8)
    g = torch.Generator().manual_seed(seed)
    q, s = torch.randn(2, 8, 7, 6, generator=g), torch.randn(2, 2, 8, 7, 6, generator=g)
    qh, sh = torch.randn(2, 16, 7, 6, generator=g), torch.randn(2, 2, 16, 7, 6, generator=g)
    m = (torch.rand(2, 2, 28, 24, generator=g) > 0.5).float()

    def pipeline(q, s, qh, sh, m):
        maps, pseudo = sam(qh, sh, m)
        _, refined, filt = ffm(q, s, m, pseudo)
        return (maps, refined, filt, *dcm_mod(filt, s, m))

    return pipeline, (q, s, qh, sh, m), (dcm_mod, ffm)


def test_modules_match_torch_backend():
    """The three modules end to end (fp32): dispatch + kernels together, against the float64 torch path."""
    pipeline, (q, s, qh, sh, m), (dcm_mod, ffm) = _modules_pipeline(8)
    got = pipeline(q, s, qh, sh, m)  # float32 parameters, triton backend
    dcm_mod.double(), ffm.double()
    with dcm.use_backend("torch"):
        ref = pipeline(q.double(), s.double(), qh.double(), sh.double(), m.double())
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-4, rel(a, b)


def test_modules_under_torch_compile_match_eager():
    """The three modules (forward + backward) under ``torch.compile(fullgraph=True)``: every op goes
    through its custom op (dcm::dynconv_*, SAM's and the foreground ops) with fake implementations and
    registered autograd; outputs and gradients equal the eager Triton path's."""
    import torch._dynamo

    pipeline, (q, s, qh, sh, m), _ = _modules_pipeline(13)
    torch._dynamo.reset()
    compiled = torch.compile(pipeline, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (pipeline, compiled):
        ins = [leaf(t) for t in (q, s, qh, sh)]
        out = fn(*ins, m)
        grads = torch.autograd.grad(sum(o.float().sum() * (i + 1) for i, o in enumerate(out)), ins)
        results.append((out, grads))
    (eo, eg), (co, cg) = results
    for a, b in zip(co + cg, eo + eg):
        assert a.shape == b.shape and rel(a, b) < 1e-6, rel(a, b)


@pytest.mark.parametrize("kernel_norm", ["l1", "l2"])
def test_dynamic_conv_module_kernel_norm_matches_float64_loop(kernel_norm):
    """DCM with normalised kernels on the Triton path (fp32, forward + input gradient) against the
    literal float64 per-channel loop of ``dcm.reference``."""
    from dcm import reference as R

    torch.manual_seed(0)
    mod = dcm.DynamicConvModule(6, kernel_norm=kernel_norm)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 7, 5, generator=g).requires_grad_(True)
    s = torch.randn(2, 2, 6, 6, 6, generator=g)
    m = (torch.rand(2, 2, 12, 12, generator=g) > 0.4).float()
    got = mod(q, s, m)
    (gq,) = torch.autograd.grad(sum(o.sum() * (i + 1) for i, o in enumerate(got)), q)
    q64 = q.detach().double().requires_grad_(True)
    mod.double()
    ref = R.dynamic_convolution_loop(q64, s.double(), m.double(), dict(mod.generators), kernel_norm=kernel_norm)
    (gr,) = torch.autograd.grad(sum(o.sum() * (i + 1) for i, o in enumerate(ref)), q64)
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-4, rel(a, b)
    assert rel(gq, gr) < 1e-4


# ---------------------------------------------------------------------------------- the GPU sweep's kernel variants
# benchmarks/gpu_session.sh times the knob configurations of its SWEEP_PLAN on a GPU (speed.py's shapes:
# B = 8, 60 x 60, C = 256 / 2048). Every kernel variant a line of that plan launches runs here first, read
# from the script itself, at the launch structure the benchmark gets (row chunks, support splits, position
# chunks) on small inputs.
def _gpu_sweep_plan():
    from _gpu_plan import sweep_plan

    plan = []
    for line in sweep_plan():
        knobs = {k: v[0] for k, v in kernels.KNOBS.items()}
        knobs.update(line["knobs"])
        plan.append((line["dtype"], line["ops"], knobs))
    return plan


_PLAN = _gpu_sweep_plan()
_SWEEP_DW = sorted({(dt, k["DW_ROWS"], k["DW_PROGRAMS"]) for dt, ops, k in _PLAN if "dynconv" in ops})
_SWEEP_SAM = sorted({(k["SAM_BP"], k["SAM_BR"], k["SAM_WARPS"], k["SAM_PROGS"]) for dt, ops, k in _PLAN if "sam" in ops})
_SWEEP_FG = sorted({(dt, k["FG_SM_PROGRAMS"]) for dt, ops, k in _PLAN if "fgpool" in ops})


def _cdiv(a, b):
    return -(-a // b)


def _compare_once(fn, args, *, tol, gtol, metric=rel):
    """``compare`` with a single Triton forward (these shapes are slow to interpret)."""
    with dcm.use_backend("triton"):
        got = fn(*args)
    got = got if isinstance(got, tuple) else (got,)
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(o.shape, generator=g, dtype=D) for o in got]
    ins = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    ggot = torch.autograd.grad(got, ins, [gr.to(o.dtype) for gr, o in zip(grads, got)], allow_unused=True)
    ref_args = [leaf(a.double()) if isinstance(a, torch.Tensor) and a.requires_grad
                else (a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a) for a in args]
    ref, gref = run(fn, *ref_args, backend="torch", grads=grads)
    assert len(got) == len(ref)
    for o, r in zip(got, ref):
        assert o.shape == r.shape and torch.isfinite(o).all()
        assert metric(o, r) < tol, (metric(o, r), tol)
    for a, b in zip(ggot, gref):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel(a, b) < gtol, (rel(a, b), gtol)


@pytest.mark.parametrize("dtype, rows, programs", _SWEEP_DW, ids=[f"{d}-rows{r}-programs{p}" for d, r, p in _SWEEP_DW])
def test_dynamic_conv_gpu_sweep_variants(monkeypatch, dtype, rows, programs):
    """Each (DW_ROWS, DW_PROGRAMS) of the sweep in its dtype: one 60 x 60 plane (64-wide blocks, one
    column block) cut into the row chunks each of the benchmark's 8 x 256 planes gets, forward and
    both gradients (the dx and dW kernels use the same chunks)."""
    from dcm.kernels import dynamic_conv as K

    monkeypatch.setattr(K, "_ROWS", rows)
    monkeypatch.setattr(K, "_TARGET_PROGRAMS", programs)
    K._roll_cfg.cache_clear()
    try:
        bench = K._roll_cfg(8 * 256, 60, 60)  # (BW, warps, column blocks, rows per chunk, chunks)
        monkeypatch.setattr(K, "_TARGET_PROGRAMS", bench[4] * bench[2])  # the same chunks on one plane
        K._roll_cfg.cache_clear()
        assert K._roll_cfg(1, 60, 60) == bench, (K._roll_cfg(1, 60, 60), bench)
        dt = getattr(torch, dtype)
        g = torch.Generator().manual_seed(100 * rows + programs)
        x = torch.randn(1, 1, 60, 60, generator=g).to(dt).requires_grad_()
        ws = [(torch.randn(1, 1, *k, generator=g) / k[0]).to(dt).requires_grad_() for k in KSETS["vhs5"]]
        tol, gtol = (1e-5, 2e-5) if dt == torch.float32 else (1e-2, 2e-2)
        _compare_once(lambda x, *ws: DF.dynamic_depthwise_conv2d_multi(x, list(ws)), [x, *ws], tol=tol, gtol=gtol)
    finally:
        K._roll_cfg.cache_clear()


@pytest.mark.parametrize("bp, br, warps, progs", _SWEEP_SAM, ids=[f"bp{a}-br{b}-warps{c}-progs{d}" for a, b, c, d in _SWEEP_SAM])
def test_support_activation_gpu_sweep_variants(monkeypatch, bp, br, warps, progs):
    """Each (SAM_BP, SAM_BR, SAM_WARPS, SAM_PROGS) of the sweep: the window kernel with those blocks and
    warps, the support positions split into as many chunks as the benchmark's launch (8 samples,
    3600 x 3600 positions) gets, on 9 x 9 maps (partial query and support blocks; the interpreter runs
    every num_warps alike). The window kernel reads the float32 Gram in both dtypes, so the float32
    mode stands for the bfloat16 lines too; its arg-max is checked through the gradients."""
    from dcm.kernels import support_activation as S

    G, HW, hw = 8, 3600, 9
    splits = max(1, min(_cdiv(HW, bp), _cdiv(progs, _cdiv(HW, br) * G)))  # the benchmark's support chunks
    bench = _cdiv(HW, _cdiv(_cdiv(HW, splits), bp) * bp)
    for name, v in (("_WIN_BP", bp), ("_WIN_BR", br), ("_WIN_WARPS", warps), ("_WIN_PROGRAMS", bench * _cdiv(hw * hw, br))):
        monkeypatch.setattr(S, name, v)
    launches, kernel = [], S._win_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                launches.append((tuple(grid), kw["BP"], kw["BR"], kw["num_warps"]))
                return kernel[grid](*a, **kw)
            return launch

    monkeypatch.setattr(S, "_win_kernel", Spy())
    g = torch.Generator().manual_seed(bp + br + warps + progs)
    q = torch.randn(1, 16, hw, hw, generator=g).requires_grad_()
    s = torch.randn(1, 1, 16, hw, hw, generator=g).requires_grad_()
    m = (torch.rand(1, 1, 2 * hw, 2 * hw, generator=g) > 0.4).float()
    _compare_once(lambda q, s, m: DF.support_activation(q, s, m, ((5, 1), (3, 3), (1, 5))), [q, s, m],
                  tol=1e-4, gtol=1e-4, metric=maxabs)
    assert launches and all(x == ((_cdiv(hw * hw, br), bench, 1), bp, br, warps) for x in launches), (launches, bench)


@pytest.mark.parametrize("dtype, sm_programs", _SWEEP_FG, ids=[f"{d}-smprograms{p}" for d, p in _SWEEP_FG])
def test_foreground_pool_gpu_sweep_variants(monkeypatch, dtype, sm_programs):
    """Each FG_SM_PROGRAMS of the sweep in its dtype: on a pretend 4-SM device with 2 samples x 2 channel
    blocks the value sets the position chunks per (sample, channel block), from one chunk of every block to one
    block per chunk. bfloat16 lines run as float16: the GPU's bf16 path (features in their own dtype in the
    product, 64-position blocks) is the fp16 one under the interpreter, whose bf16 tl.dot is wrong."""
    from dcm.kernels import foreground as fk

    dt = torch.float16 if dtype == "bfloat16" else getattr(torch, dtype)
    monkeypatch.setattr(fk, "_SM_PROGRAMS", sm_programs)
    monkeypatch.setattr(fk, "_sm_count", lambda device: 4)
    B, K, C, H, W = 2, 1, 40, 17, 13
    NB, BC, BL, chunk, nsplit = fk._fwd_meta(B, C, K * H * W, (5, 25), torch.device("cpu"), dt == torch.float32)
    assert fk._half_dot(torch.empty(1, dtype=dt)) == (dt != torch.float32)
    assert B * _cdiv(C, BC) == 4 and 1 <= nsplit <= min(_cdiv(H * W, BL), sm_programs)
    assert (nsplit > 1) == (sm_programs > 1) and (chunk > BL) == (sm_programs < _cdiv(H * W, BL)), (chunk, BL, nsplit)
    g = torch.Generator().manual_seed(sm_programs)
    feat = torch.randn(B, K, C, H, W, generator=g).to(dt).requires_grad_()
    m = torch.tensor([0.0, 0.3, 0.7, 1.0])[torch.randint(0, 4, (B, K, H, W), generator=g)]
    m[1] = 0.0  # no foreground: the peak fallback
    tol = 1e-5 if dt == torch.float32 else 1e-2
    _compare_once(lambda f, m: DF.foreground_pool(f, m, bins=(5, 25)), [feat, m], tol=tol, gtol=tol)
