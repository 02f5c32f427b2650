"""dcm's public API (docs/CONTRACTS.md#dcm-public-api): what ``dcm`` and ``dcm.functional`` export resolves,
and every name that models/ takes from dcm is part of it."""
import ast
from pathlib import Path

import dcm
import dcm.functional as DF

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = {"dcm": set(dcm.__all__), "dcm.functional": set(DF.__all__)}


def test_exported_names_resolve():
    for module, names in ((dcm, dcm.__all__), (DF, DF.__all__)):
        for name in names:
            assert getattr(module, name) is not None, (module.__name__, name)
    assert set(dcm.DCM_FUSIONS) == {"replace", "residual"}
    for mode in dcm.DCM_FUSIONS:
        dcm.DCMFusion(4, 1, mode)


def _dcm_imports(path: Path):
    """``(line, module, name)`` of every ``from dcm... import name`` in a file."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "dcm":
            for alias in node.names:
                yield node.lineno, node.module, alias.name


def test_models_take_only_public_names_from_dcm():
    """Every name models/ imports from dcm is exported by ``dcm`` or ``dcm.functional`` (its ``__all__``)."""
    public = set().union(*PUBLIC.values())
    private = [f"{p.relative_to(ROOT)}:{line}: from {mod} import {name}"
               for p in sorted((ROOT / "models").rglob("*.py")) for line, mod, name in _dcm_imports(p)
               if name not in public and not (mod == "dcm" and name == "functional")]
    assert not private, private
