"""Shared by tests/test_canet.py and tests/test_pfenet.py: a tiny episode and helpers on head parameters."""
import torch

SIZE = 65


def episode(B=1, K=1, size=SIZE, seed=0):
    """Images with a rectangle object of constant colour, masks {0,1} (+255 border on the query)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 3, size, size, generator=g)
    s = torch.randn(B, K, 3, size, size, generator=g)
    sm = torch.zeros(B, K, size, size, dtype=torch.long)
    qm = torch.zeros(B, size, size, dtype=torch.long)
    for b in range(B):
        for k in range(K):
            y0, x0 = int(torch.randint(0, size // 2, (1,), generator=g)), int(torch.randint(0, size // 2, (1,), generator=g))
            sm[b, k, y0 : y0 + size // 3, x0 : x0 + size // 3] = 1
            s[b, k, :, y0 : y0 + size // 3, x0 : x0 + size // 3] += 2.0
        qm[b, 10:40, 20:50] = 1
        q[b, :, 10:40, 20:50] += 2.0
        qm[b, :, :2] = 255
    return q, s, sm, qm


def head_names(model):
    """Names of the parameters outside the backbone."""
    return {n for n, p in model.named_parameters() if not n.startswith("backbone.")}
