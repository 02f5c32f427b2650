"""Every Triton kernel launch of ``dcm.kernels`` compiles to an H100 (sm_90) binary, on a machine without a GPU.

The interpreter tests (``tests/kernels_interpreted.py``) check what the kernels compute, but not that
Triton can compile them for a GPU: shapes of ``tl.dot`` operands, layouts, dtypes of the tensor-core
paths and register allocation only meet the real compiler. Here the ops run on CPU tensors with
``JITFunction.__getitem__`` replaced by a recorder, so each launch the launchers make (forward and
backward, float32 / bfloat16 / float16, every kernel family) is captured with its argument types and
compile-time constants instead of being run; each distinct one is then compiled ahead of time with
``triton.compile(..., target=GPUTarget("cuda", 90, 32))``, down to a cubin (Triton's bundled
``ptxas``). What the kernels compute on the GPU and how fast: ``tests/test_kernels_cuda.py`` and
``benchmarks/speed.py`` on a GPU.
"""
from collections import Counter

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (it ships with the CUDA builds of torch)")

import dcm  # noqa: E402
import dcm.config  # noqa: E402
import dcm.functional as DF  # noqa: E402

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
           torch.int64: "i64", torch.uint8: "u8"}


class _Recorder:
    """Stands in for ``kernel[grid]``: records the launch as (kernel, signature, constants, options)."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __call__(self, *args, **kwargs):
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
        bound = dict(zip(self.fn.arg_names, args), **kwargs)
        sig, consts = {}, {}
        for p in self.fn.params:
            v = bound[p.name]
            if p.is_constexpr:
                sig[p.name], consts[p.name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = "*" + _DTYPES[v.dtype]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            elif isinstance(v, float):
                sig[p.name] = "fp32"
            else:
                raise TypeError(f"{self.fn.fn.__name__}: argument {p.name} of unexpected type {type(v)}")
        key = (self.fn.fn.__name__, tuple(sig.items()), tuple(consts.items()), tuple(sorted(opts.items())))
        self.calls.setdefault(key, (self.fn, sig, consts, opts))


@pytest.fixture()
def launches(monkeypatch):
    """Run the three ops (forward + backward) through the Triton launchers on CPU, recording every launch."""
    from triton.runtime.jit import JITFunction

    from dcm import kernels

    if kernels.interpreted():
        pytest.skip("kernels imported under TRITON_INTERPRET=1 (interpreted functions, nothing to compile)")
    if not kernels._importable():
        pytest.fail("Triton is installed but dcm.kernels does not import")
    calls = {}
    monkeypatch.setattr(JITFunction, "__getitem__", lambda self, grid: _Recorder(self, calls))
    monkeypatch.setattr(dcm.config, "_triton_interpreted", lambda: True)  # CPU tensors -> the launchers
    monkeypatch.setitem(dcm.config._state, "data_checks", False)  # the recorded launches write nothing
    from dcm.kernels import foreground

    monkeypatch.setattr(foreground, "_half_dot", lambda feat: True)  # what CUDA tensors get (bf16 included)
    g = torch.Generator().manual_seed(0)
    with dcm.use_backend("triton"):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(2, 16, 30, 29, generator=g).to(dt).requires_grad_()
            for ks in ([(5, 1), (1, 5), (5, 5)], [(5, 5), (1, 5), (5, 1), (3, 3)], [(9, 9), (7, 3)]):
                ws = [torch.randn(2, 16, kh, kw, generator=g).to(dt).requires_grad_() for kh, kw in ks]
                outs = DF.dynamic_depthwise_conv2d_multi(x, ws)
                torch.autograd.grad(outs, [x] + ws, [torch.ones_like(o) for o in outs])
            q = torch.randn(2, 64, 13, 11, generator=g).to(dt).requires_grad_()
            s = torch.randn(2, 2, 64, 13, 11, generator=g).to(dt).requires_grad_()
            m = (torch.rand(2, 2, 13, 11, generator=g) > 0.5).float()
            out = DF.support_activation(q, s, m)
            torch.autograd.grad(out[0].float().sum(), [q, s])
            for bins in ((5, 25), (3, 100)):
                f = torch.randn(4, 1, 64, 60, 60, generator=g).to(dt).requires_grad_()
                outs = DF.foreground_pool(f, (torch.rand(4, 1, 60, 60, generator=g) > 0.5).float(), bins)
                torch.autograd.grad(outs, f, [torch.ones_like(o) for o in outs])
    return calls


def test_every_kernel_compiles_for_sm90(launches):
    import triton.compiler as tc
    from triton.backends.compiler import GPUTarget

    families = Counter(key[0] for key in launches)
    expected = {"_dw_fwd_roll", "_dw_dx_roll", "_dw_dw_roll", "_dw_fwd_kernel", "_dw_dx_kernel", "_dw_dw_kernel",
                "_prep_kernel", "_win_kernel", "_dg_kernel", "_norm_bwd_kernel",
                "_fg_select_kernel", "_fg_pool_fwd_kernel", "_fg_pool_finish_kernel", "_fg_pool_bwd_kernel"}
    assert expected <= set(families), f"launches not recorded: {sorted(expected - set(families))}"
    from dcm.kernels.foreground import SELECT_OPTS
    from dcm.kernels.launch import LAUNCH_OPTS

    want = {name: SELECT_OPTS if name == "_fg_select_kernel" else LAUNCH_OPTS for name in families}
    unpinned = sorted({key[0] for key, (_, _, _, opts) in launches.items()
                       if opts.get("enable_fp_fusion") is not want[key[0]]["enable_fp_fusion"]})
    assert not unpinned, f"launches whose FMA contraction is not the pinned one (LAUNCH_OPTS / SELECT_OPTS): {unpinned}"
    target = GPUTarget("cuda", 90, 32)
    failed = []
    for (name, _, consts, _), (fn, sig, const_vals, opts) in launches.items():
        try:
            k = triton.compile(tc.ASTSource(fn, sig, const_vals), target=target, options=opts)
            assert k.asm.get("cubin"), "no cubin"
        except Exception as e:  # collect all, report together
            failed.append(f"{name} {dict(consts)} {opts}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    assert not failed, f"{len(failed)} of {len(launches)} launches do not compile for sm_90:\n" + "\n".join(failed)


def test_tuning_knobs_read_and_validate_the_environment(monkeypatch):
    from dcm.kernels import KNOBS, tuning

    monkeypatch.delenv("DCM_DW_ROWS", raising=False)
    assert tuning("DW_ROWS") == KNOBS["DW_ROWS"][0] == 4
    monkeypatch.setenv("DCM_DW_ROWS", " 2 ")
    assert tuning("DW_ROWS") == 2
    for bad in ("5", "0", "two", "2.0"):
        monkeypatch.setenv("DCM_DW_ROWS", bad)
        with pytest.raises(ValueError, match=r"DCM_DW_ROWS=.*\[1, 4\]"):
            tuning("DW_ROWS")
    monkeypatch.setenv("DCM_SAM_WARPS", "6")
    with pytest.raises(ValueError, match="DCM_SAM_WARPS='6'.*power of two"):
        tuning("SAM_WARPS")
    monkeypatch.setenv("DCM_SAM_WARPS", "8")
    assert tuning("SAM_WARPS") == 8


def test_mask_selection_is_not_contracted_to_fma(launches):
    """The selection kernel's PTX has no float32 FMA: its bilinear weight ``scale·y − y0`` and blend are
    rounded operation by operation, as PyTorch's resize computes them. Contracted, the weight keeps the
    unrounded product and a 0/1 mask exactly halfway between two rows crosses the threshold on the GPU
    (``dcm.kernels.foreground.SELECT_OPTS``). The other kernels keep ``LAUNCH_OPTS`` (contraction on)."""
    import triton.compiler as tc
    from triton.backends.compiler import GPUTarget

    sel = [v for key, v in launches.items() if key[0] == "_fg_select_kernel"]
    assert sel, "no selection launch recorded"
    for fn, sig, consts, opts in sel:
        ptx = triton.compile(tc.ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
        assert "mul.rn.f32" in ptx, "expected the resize's float32 multiplications in the PTX"
        assert "fma.rn.f32" not in ptx, "the selection kernel's float32 arithmetic is contracted to FMA"
