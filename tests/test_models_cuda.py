"""One bf16-autocast training step of each registered network at 473×473, batch 8 (issue 3's GPU
check). Skipped without a GPU; prints the step time (run with -s to see it)."""
import time

import pytest
import torch

from models import build_model, list_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", list_models())
def test_training_step_bf16_473_batch8(name):
    torch.manual_seed(0)
    model = build_model(name, backbone="resnet50", shot=1, backbone_weights="random").cuda().train()
    opt = torch.optim.SGD([p for g in model.param_groups(0.005) for p in g["params"]], lr=0.005, momentum=0.9)
    B, H = 8, 473
    q = torch.randn(B, 3, H, H, device="cuda")
    s = torch.randn(B, 1, 3, H, H, device="cuda")
    sm = (torch.rand(B, 1, H, H, device="cuda") < 0.3).long()
    qm = (torch.rand(B, H, H, device="cuda") < 0.3).long()
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(q, s, sm, qm)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        assert torch.isfinite(out["loss"]), name
    assert out["logits"].shape == (B, 2, H, H)
    print(f"\n{name}: bf16 train step 473x473 batch 8 on {torch.cuda.get_device_name()}: {min(times) * 1e3:.1f} ms")
