import os
from pathlib import Path

import pytest
import torch

# repository root's sibling "shared/data" holds the small real VOC / COCO sets (never copied here)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

#: run by hand in a checkout of the release before the DCM spec (its docstring says how), not a test module
collect_ignore = ["fixtures/make_models_v1.py"]

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _kernels_under_test() -> None:
    """On a CUDA machine the tests exercise the Triton kernels under ``DCM_BACKEND=auto``: unless the
    caller gave ``DCM_VERIFIED`` (benchmarks/gpu_session.sh does), a candidate record of the current
    sources is written to a temporary file for this test process, so that "auto" picks the kernels
    whatever the shipped record says (the shipped record decides what users get, not what is tested)."""
    if not torch.cuda.is_available() or os.environ.get("DCM_VERIFIED"):
        return
    import tempfile

    from dcm import verification as V
    here = V._here()
    if here is None:
        return
    fd, path = tempfile.mkstemp(prefix="dcm-candidate-", suffix=".json")
    os.close(fd)
    V.write(path, V.candidate(here, V.current_keys()), about="candidate record of a test process: never commit it.")
    os.environ["DCM_VERIFIED"] = path


_kernels_under_test()


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster on a shared (oversubscribed) CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _reset_dcm_warnings():
    from dcm import _check

    _check.reset_warnings()
    yield
    _check.reset_warnings()


@pytest.fixture(scope="module")
def resnet():
    """A random ResNet-50 backbone, the same in every run (tests of the PFENet / CANet hosts)."""
    from models.backbones import build_backbone

    torch.manual_seed(1234)
    return build_backbone("resnet50", weights="random")
