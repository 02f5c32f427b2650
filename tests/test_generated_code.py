"""Generated source files are what their generators write now (edit the generator, then rerun it)."""
import subprocess
from pathlib import Path

from dcm.kernels import _gen_rolling

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "dcm" / "kernels" / "generated"


def test_rolling_kernels_match_their_generator():
    files = _gen_rolling.files()
    assert _gen_rolling.OUT == GENERATED
    for name, text in files.items():
        path = GENERATED / name
        assert path.read_text() == text, f"{path} is out of date: run `python -m dcm.kernels._gen_rolling`"
    # the folder holds the generator's output and nothing else (no hand-written or stale file)
    assert {p.name for p in GENERATED.iterdir() if p.name != "__pycache__"} == set(files)


def test_generated_files_are_marked_generated():
    """.gitattributes marks every file of the folder linguist-generated (collapsed in diffs) and nothing else."""
    paths = [str((GENERATED / name).relative_to(ROOT)) for name in _gen_rolling.files()] + ["dcm/kernels/dynamic_conv.py"]
    res = subprocess.run(["git", "check-attr", "linguist-generated", "--", *paths], cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        import pytest

        pytest.skip(f"git check-attr unavailable here: {res.stderr.strip()[:200]}")
    marks = {line.split(": ")[0]: line.split(": ")[-1] for line in res.stdout.splitlines()}
    assert marks == {p: ("true" if "/generated/" in p else "unspecified") for p in paths}, marks
