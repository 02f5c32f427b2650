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


def tiny_backbone_factory(**kw):
    """A three-convolution backbone (layer2: 4, layer3: 6, layer4: 8 channels, stride 4), for networks
    small enough to keep as test fixtures; :func:`register_tiny_backbone` names it ``"tiny"``."""
    from torch import nn

    from models.backbones.base import Backbone

    class TinyBackbone(Backbone):
        name = "tiny"
        channels = {"layer2": 4, "layer3": 6, "layer4": 8}
        strides = {"layer2": 4, "layer3": 4, "layer4": 4}

        def __init__(self, *, freeze_bn=True, input_norm="imagenet"):
            super().__init__(freeze_bn=freeze_bn, input_norm=input_norm)
            self.stem = nn.Conv2d(3, 4, 3, stride=4, padding=1)
            self.layer3 = nn.Conv2d(4, 6, 3, padding=1)
            self.layer4 = nn.Conv2d(6, 8, 3, padding=1)
            self._finish_init()

        def _forward_mid(self, x):
            l2 = torch.relu(self.stem(x))
            return l2, torch.relu(self.layer3(l2))

        def _forward_high(self, layer3):
            return torch.relu(self.layer4(layer3))

        def _high_modules(self):
            return [self.layer4]

    return TinyBackbone(**kw)


def register_tiny_backbone() -> str:
    """Register :func:`tiny_backbone_factory` as backbone ``"tiny"`` (idempotent); returns the name."""
    from models.backbones import registry

    registry.register_backbone("tiny", tiny_backbone_factory, overwrite=True)
    return "tiny"


def unregister_tiny_backbone() -> None:
    """Remove backbone ``"tiny"`` again, so that tests of the registry's names see only the shipped ones."""
    from models.backbones import registry

    registry.BACKBONES.pop("tiny", None)


def synthetic_state(keys_shapes):
    """Weights that depend only on each key's name and shape (``running_var`` positive, counters 0)."""
    import zlib

    out = {}
    for name, shape in keys_shapes:
        if name.endswith("num_batches_tracked"):
            out[name] = torch.zeros((), dtype=torch.long)
            continue
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        t = torch.randn(*shape, generator=g) * 0.3
        out[name] = t.abs() + 0.5 if name.endswith("running_var") else t
    return out
