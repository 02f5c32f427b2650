import os
from pathlib import Path

import pytest
import torch

# repository root's sibling "shared/data" holds the small real VOC / COCO sets (never copied here)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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
