"""One naming scheme (docs/CONVENTIONS.md#naming): the foreground threshold, the networks' common
arguments and their DCM argument, and the deprecated spellings that keep working for one release."""
import inspect
import warnings

import pytest
import torch

import dcm.functional as DF
import dcm.reference as ref
from dcm import DynamicConvModule
from models.canet import CANet
from models.dcm_spec import DCMSpec
from models.dpcn import DPCN
from models.pfenet import PFENet

NETWORKS = (DPCN, PFENet, CANet)


def _params(fn):
    return list(inspect.signature(fn).parameters.values())


def test_fg_threshold_is_one_name_in_the_functional_and_module_api():
    for fn in (DF.foreground_selection, DF.foreground_pool, DF.generate_dynamic_kernels, DF.dynamic_convolution,
               ref.foreground_pool_loop, ref.dynamic_convolution_loop):
        names = [p.name for p in _params(fn)]
        assert "fg_threshold" in names and "threshold" not in names, fn.__name__
    assert "fg_threshold" in [p.name for p in _params(DynamicConvModule)]


def test_deprecated_threshold_keyword_warns_and_means_fg_threshold():
    torch.manual_seed(0)
    feat, mask = torch.randn(2, 1, 4, 6, 6), torch.rand(2, 1, 6, 6)
    want = DF.foreground_pool(feat, mask, (5, 25), fg_threshold=0.7)
    with pytest.warns(DeprecationWarning, match="'threshold' is deprecated.*'fg_threshold'"):
        got = DF.foreground_pool(feat, mask, (5, 25), threshold=0.7)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the threshold reaches the selection: another value gives another pooling
    other = DF.foreground_pool(feat, mask, (5, 25), fg_threshold=0.2)
    assert not torch.equal(want[1], other[1])
    with pytest.raises(TypeError, match="both 'threshold' and 'fg_threshold'"):
        DF.foreground_selection(mask, threshold=0.5, fg_threshold=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns nothing
        DF.foreground_selection(mask, fg_threshold=0.5)


def test_networks_share_positional_arguments_and_the_dcm_argument():
    mod_defaults = {p.name: p.default for p in _params(DynamicConvModule)}
    for cls in NETWORKS:
        ps = _params(cls.__init__)[1:]
        positional = [p.name for p in ps if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert positional == ["backbone", "backbone_weights", "shot"], cls.__name__
        names = [p.name for p in ps]
        # the DCM is one argument; the flat flags are no parameters (they reach the **legacy shim)
        assert not [n for n in names if n.startswith("dcm_") or n == "use_dcm"], cls.__name__
        assert ps[-1].kind is ps[-1].VAR_KEYWORD and ps[-1].name == "legacy", cls.__name__
        for common in ("reduce_dim", "dcm", "freeze_backbone_bn"):
            assert common in names, (cls.__name__, common)
    # the spec's module fields: the names and defaults of DynamicConvModule's arguments
    for name, value in DCMSpec().module_kwargs().items():
        assert value == mod_defaults[name], name


@pytest.mark.parametrize("cls", [PFENet, CANet])
def test_dcm_spec_fields_reach_the_module(cls):
    m = cls("resnet50", backbone_weights="random", reduce_dim=8,
            dcm=DCMSpec(kernel_size=3, variants=("v", "s"), square_source="parallel", kgen_kernel_size=1,
                        fg_threshold=0.25, kernel_norm="l1"))
    d = m.dcm
    assert (d.kernel_size, d.variants, d.square_source, d.fg_threshold, d.kernel_norm) == (3, ("v", "s"), "parallel", 0.25, "l1")
    assert d.generators["v"][0].kernel_size == (1,)


@pytest.mark.parametrize("cls", [PFENet, CANet])
def test_deprecated_dcm_kwargs_warn_and_build_the_same_network(cls):
    torch.manual_seed(0)
    flat = cls("resnet50", backbone_weights="random", reduce_dim=8, dcm={"kernel_size": 3, "kernel_norm": "l2"})
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match=r"flat DCM flags \(dcm_kwargs, use_dcm\) are deprecated"):
        old = cls("resnet50", backbone_weights="random", reduce_dim=8, use_dcm=True,
                  dcm_kwargs={"kernel_size": 3, "kernel_norm": "l2"})
    sa, sb = flat.state_dict(), old.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert old.dcm.kernel_norm == "l2" and old.dcm_spec == flat.dcm_spec
    with pytest.raises(ValueError, match="given but use_dcm=False"):
        cls("resnet50", backbone_weights="random", reduce_dim=8, dcm_kwargs={"kernel_size": 3})
    with pytest.raises(ValueError, match="'channels' is fixed"):
        cls("resnet50", backbone_weights="random", reduce_dim=8, use_dcm=True, dcm_kwargs={"channels": 8})
    with pytest.raises(ValueError, match="unknown key 'kernel'"):
        cls("resnet50", backbone_weights="random", reduce_dim=8, use_dcm=True, dcm_kwargs={"kernel": 3})
    with pytest.raises(ValueError, match="'kernel_size' given twice"):
        cls("resnet50", backbone_weights="random", reduce_dim=8, use_dcm=True, dcm_kernel_size=3,
            dcm_kwargs={"kernel_size": 7})


def test_dpcn_old_positional_order_warns_and_keeps_its_meaning():
    small = dict(reduce_dim=8, decoder_dim=8)
    with pytest.warns(DeprecationWarning, match="positional order"):
        m = DPCN("resnet50", 5, "random", **small)
    assert m.shot == 5
    with pytest.warns(DeprecationWarning, match="positional order"):
        m = DPCN("resnet50", 2, **small)
    assert m.shot == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        m = DPCN("resnet50", "random", 3, **small)
    assert m.shot == 3


def _benchmarks_layout():
    """(commands: top-level stems of benchmarks/, packages: its sub-packages, modules: their public module stems)."""
    from pathlib import Path
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    commands = [p for p in sorted(bench.glob("*.py")) if p.stem != "__init__"]
    packages = [p for p in sorted(bench.iterdir()) if (p / "__init__.py").is_file()]
    modules = [m for pkg in packages for m in sorted(pkg.glob("*.py")) if not m.stem.startswith("_")]
    return commands, packages, modules


def test_benchmarks_top_level_holds_only_commands():
    """Every ``benchmarks/*.py`` is a command (a ``main`` run under ``__main__``); the library modules of the
    sub-packages are not."""
    import ast
    commands, packages, modules = _benchmarks_layout()
    assert {"plug_in", "evaluate", "speed", "intervals", "feature_store"} <= {p.stem for p in commands}
    assert {"datasets", "scoring", "engine"} <= {p.name for p in packages}
    for p in commands:
        tree = ast.parse(p.read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), f"{p.name}: no main()"
        assert 'if __name__ == "__main__"' in p.read_text(), f"{p.name}: not runnable"
    for m in modules:
        assert 'if __name__ == "__main__"' not in m.read_text(), f"library module {m} is a command; move it to benchmarks/"


def test_no_script_is_confusable_with_a_library_module():
    import os
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    commands, packages, modules = _benchmarks_layout()
    library = [p.name for p in packages] + [m.stem for m in modules]
    examples = [p.stem for p in (root / "examples").glob("*.py")]
    assert {"protocols", "inference", "metrics", "config"} <= set(library)
    # commands against every library name, examples against the packages: alike = they share a prefix of at
    # least 3 characters that leaves at most 2 of the shorter name
    pairs = [(s.stem, lib) for s in commands for lib in library] + [(s, p.name) for s in examples for p in packages]
    for s, lib in pairs:
        assert not lib.endswith("_lib"), lib
        shared = len(os.path.commonprefix([s, lib]))
        assert shared < max(3, min(len(s), len(lib)) - 2), f"script {s}.py and library module {lib} look alike"


def test_no_command_imports_a_private_name_or_another_command():
    """The commands (benchmarks/*.py) and examples import only public names of the library (``benchmarks.engine``,
    ``benchmarks.scoring``, ``benchmarks.datasets``, ``models``, ``dcm``) and no other command."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    commands, _, _ = _benchmarks_layout()
    names = {f"benchmarks.{p.stem}" for p in commands}
    found = []
    for p in commands + sorted((root / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            mod = node.module or ""
            if mod in names:
                found.append(f"{p.name}:{node.lineno}: imports the command {mod}")
            if mod.split(".")[0] in ("benchmarks", "models", "dcm"):
                found += [f"{p.name}:{node.lineno}: {mod}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not found, found
