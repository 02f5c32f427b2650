"""evaluate(predict_fn, dataset_factory, protocol): scoring resolutions, multi-scale, seeds, reporting."""
# the hand-made episodes below use class 1 only; FewShotIoU warns that class 2 got none (tested in test_metrics)
import json
import math


import pytest
import torch
from torch.utils.data import Dataset

from benchmarks import BAM_SEEDS, EvaluationResult, Protocol, dataset_factory, evaluate
from benchmarks.datasets.transforms import letterbox_shape

pytestmark = pytest.mark.filterwarnings("ignore:FewShotIoU. classes:RuntimeWarning")


class FakeEval(Dataset):
    """Hand-made eval episodes: one original label per episode, letterboxed by the protocol transform."""

    training = False

    def __init__(self, labels, transform, class_ids=(1, 2)):
        self.labels = labels
        self.transform = transform
        self.class_ids = list(class_ids)
        self.class_names = {c: f"c{c}" for c in class_ids}

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        lab = self.labels[i]
        img = torch.zeros(lab.shape + (3,), dtype=torch.uint8).numpy()
        x, m = self.transform(img, lab.numpy().astype("uint8"), None)
        return {"query_img": x, "query_mask": m, "support_imgs": x[None], "support_masks": m[None],
                "class_id": self.class_ids[i % len(self.class_ids)], "class_index": i % len(self.class_ids),
                "query_label_orig": lab.long(), "query_name": f"q{i}", "support_names": [f"s{i}"]}


def fake_factory(labels):
    return lambda protocol, seed, size: FakeEval(labels, protocol.test_transform(size))


def onehot_from_mask(batch):
    """A 'perfect' predictor at input resolution: logits from the transformed query mask."""
    m = batch["query_mask"]
    fg = (m == 1).float()
    return torch.stack([1 - fg, fg], 1) * 10


def test_constant_foreground_scored_on_original_canvas():
    lab = torch.zeros(6, 4, dtype=torch.long)
    lab[:2] = 1
    lab[5] = 255
    p = Protocol(dataset="fake", episodes=1, scales=(16,), resolution="original")
    fg_everywhere = lambda b: torch.stack([torch.zeros_like(b["query_img"][:, 0]), torch.ones_like(b["query_img"][:, 0])], 1)
    r = evaluate(fg_everywhere, fake_factory([lab]), p)
    # L = 6: canvas 6x6, columns 4-5 and row 5 are 255. fg: I = 8, U = 20 valid pixels ; bg: I = 0, U = 12
    assert r.per_seed[0]["class_iou"][1] == pytest.approx(100 * 8 / 20)
    assert r.fbiou == pytest.approx(100 * (8 / 20 + 0) / 2)
    assert math.isnan(r.per_seed[0]["class_iou"][2])


@pytest.mark.parametrize("resolution", ["original", "original_crop", "input"])
def test_perfect_prediction_scores_100_when_no_resampling(resolution):
    # 16 x 8 labels letterbox to exactly 16 x 8 at size 16: no resampling anywhere
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 2, (16, 8), generator=g) for _ in range(4)]
    labels[0][0, 0] = 255
    assert letterbox_shape(16, 8, 16) == (16, 8)
    r = evaluate(onehot_from_mask, fake_factory(labels), Protocol(dataset="fake", episodes=4, scales=(16,),
                                                                   resolution=resolution))
    assert r.miou == pytest.approx(100) and r.fbiou == pytest.approx(100)


def test_original_crop_differs_from_canvas_when_content_is_resampled():
    # 37 x 23 at size 24 letterboxes to 24 x 8 (14 floored to 8): the content no longer fills the L x L canvas
    # in proportion, so PFENet's canvas scoring is misregistered while the exact crop is not
    lab = torch.zeros(37, 23, dtype=torch.long)
    lab[5:30, 3:20] = 1
    assert letterbox_shape(37, 23, 24) == (24, 8)
    res = {}
    for mode in ("original", "original_crop"):
        res[mode] = evaluate(onehot_from_mask, fake_factory([lab]), Protocol(dataset="fake", episodes=1, scales=(24,),
                                                                             resolution=mode)).miou
    assert res["original_crop"] > 70 and res["original"] < res["original_crop"] - 20


def test_multiscale_averages_probabilities_not_logits():
    lab = torch.ones(8, 8, dtype=torch.long)
    diffs = {8: 5.0, 16: -2.0, 24: -2.0}  # fg-bg logit per scale: mean logit > 0, mean prob < 0.5

    def pred(b):
        d = diffs[b["query_img"].shape[-1]]
        z = torch.zeros_like(b["query_img"][:, 0])
        return torch.stack([z, z + d], 1)

    r = evaluate(pred, fake_factory([lab]), Protocol(dataset="fake", episodes=1, scales=(8, 16, 24), resolution="input"))
    assert r.miou == pytest.approx(0.0)  # background wins: (σ(5) + 2σ(-2)) / 3 = 0.41
    r1 = evaluate(pred, fake_factory([lab]), Protocol(dataset="fake", episodes=1, scales=(8,), resolution="input"))
    assert r1.miou == pytest.approx(100.0)


def colour_prototype(batch):
    """A training-free few-shot baseline: nearest of the support fg / bg mean colours."""
    q, s, m = batch["query_img"], batch["support_imgs"], batch["support_masks"]
    fg = (m == 1).unsqueeze(2).float()
    bg = (m == 0).unsqueeze(2).float()
    pf = (s * fg).sum((1, 3, 4)) / fg.sum((1, 3, 4)).clamp(min=1)
    pb = (s * bg).sum((1, 3, 4)) / bg.sum((1, 3, 4)).clamp(min=1)
    df = ((q - pf[..., None, None]) ** 2).sum(1)
    db = ((q - pb[..., None, None]) ** 2).sum(1)
    return torch.stack([-db, -df], 1)


def test_synthetic_end_to_end_and_independent_of_batching():
    fac = dataset_factory(num_images=80, image_size=40)
    p = Protocol(dataset="synthetic", fold=1, shot=1, episodes=24, seeds=(1, 2), scales=(40,), episode_iou=True)
    r = evaluate(colour_prototype, fac, p)
    r2 = evaluate(colour_prototype, fac, p, batch_size=5, num_workers=2)
    assert r.per_seed[0]["miou"] == r2.per_seed[0]["miou"] and r.fbiou == r2.fbiou
    assert len(r.per_seed) == 2 and r.miou == pytest.approx((r.per_seed[0]["miou"] + r.per_seed[1]["miou"]) / 2)
    assert r.per_seed[0]["episodes"] == 24
    all_fg = evaluate(lambda b: torch.stack([torch.zeros_like(b["query_img"][:, 0]),
                                             torch.ones_like(b["query_img"][:, 0])], 1), fac, p)
    # the classes are separable by colour: a 1-shot colour prototype beats predicting "everything"
    assert r.miou > all_fg.miou + 25
    d = r.as_dict()
    json.dumps(d)  # serialisable
    assert d["protocol"]["seeds"] == [1, 2] and "episode_miou" in d and d["summary"] == r.summary()
    assert "synthetic fold 1 1-shot val: 24 episodes × 2 seed(s) [1,2]" in r.summary()


def test_protocol_presets_and_validation():
    bam = Protocol.preset("bam", dataset="pascal", fold=2)
    assert bam.seeds == BAM_SEEDS == (510, 365, 382, 322, 988) and bam.episodes == 1000 and bam.scales == (473,)
    assert Protocol.preset("pfenet", dataset="coco").episodes == 20000
    assert Protocol.preset("pfenet", dataset="coco").scales == (641,)
    hs = Protocol.preset("hsnet", dataset="fss")
    assert hs.fold is None and hs.split == "test" and hs.resolution == "input" and hs.resize == "squash"
    dp = Protocol.preset("dpcn", dataset="pascal", shot=5)
    assert dp.scales == (473, 641) and dp.shot == 5
    assert "multi-scale" in dp.describe() and "255 ignored" in dp.describe()
    for kw, msg in (({"resolution": "400"}, "resolution"), ({"seeds": ()}, "seeds"), ({"scales": (4,)}, "scales"),
                    ({"fold_scheme": "x"}, "fold_scheme"), ({"shot": 0}, "shot")):
        with pytest.raises(ValueError, match=msg):
            Protocol(**kw)
    with pytest.raises(ValueError, match="preset"):
        Protocol.preset("canet")


def test_bad_predict_fn_output():
    lab = torch.ones(8, 8, dtype=torch.long)
    p = Protocol(dataset="fake", episodes=1, scales=(8,))
    with pytest.raises(ValueError, match=r"logits Tensor\[B, 2, H, W\]"):
        evaluate(lambda b: torch.zeros(1, 3, 8, 8), fake_factory([lab]), p)
    with pytest.raises(ValueError, match="without 'logits'"):
        evaluate(lambda b: {"out": 1}, fake_factory([lab]), p)
    r = evaluate(lambda b: {"logits": torch.zeros(1, 2, 4, 4)}, fake_factory([lab]), p)  # upsampled leniently
    assert isinstance(r, EvaluationResult)
