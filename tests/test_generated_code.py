"""Generated source files are what their generators write now (edit the generator, then rerun it)."""
from pathlib import Path

from dcm.kernels import _gen_rolling

ROOT = Path(__file__).resolve().parents[1]


def test_rolling_kernels_match_their_generator():
    path = ROOT / "dcm" / "kernels" / "_dynconv_rolling.py"
    assert path.read_text() == _gen_rolling.render(), (
        f"{path} is out of date: run `python -m dcm.kernels._gen_rolling`")
