"""Metric values on hand-computed cases (docs/PROTOCOLS.md#metrics): accumulation, 255 ignore, empty predictions."""
import math

import pytest
import torch

from benchmarks.scoring.metrics import FewShotIoU, intersection_and_union

T = torch.tensor


def test_intersection_union_hand_case_with_ignore():
    pred = T([[1, 1, 0, 0],
              [1, 0, 0, 1]])
    target = T([[1, 0, 0, 255],
                [1, 1, 255, 255]])
    # valid pixels: (0,0) p1 t1, (0,1) p1 t0, (0,2) p0 t0, (1,0) p1 t1, (1,1) p0 t1
    # fg: I=2, |P=1|=3, |T=1|=3 -> U=4 ; bg: I=1, |P=0|=2, |T=0|=2 -> U=3
    i, u = intersection_and_union(pred, target)
    assert i.tolist() == [1, 2] and u.tolist() == [3, 4]


def test_prediction_under_ignore_does_not_count():
    target = T([[255, 255], [255, 1]])
    for p in (T([[1, 1], [1, 1]]), T([[0, 0], [0, 1]])):
        i, u = intersection_and_union(p, target)
        assert i.tolist() == [0, 1] and u.tolist() == [0, 1]


def test_empty_prediction():
    target = T([[0, 1], [1, 1]])
    i, u = intersection_and_union(torch.zeros(2, 2, dtype=torch.long), target)
    assert i.tolist() == [1, 0] and u.tolist() == [4, 3]
    m = FewShotIoU([5])
    m.update(torch.zeros(2, 2, dtype=torch.long), target, 0)
    r = m.compute()
    assert r["class_iou"][5] == 0.0 and r["miou"] == 0.0
    assert r["fbiou"] == pytest.approx((1 / 4 + 0) / 2)


def test_batched_equals_unbatched():
    g = torch.Generator().manual_seed(0)
    p = torch.randint(0, 2, (3, 5, 6), generator=g)
    t = torch.randint(0, 3, (3, 5, 6), generator=g)
    t[t == 2] = 255
    ib, ub = intersection_and_union(p, t)
    for b in range(3):
        i, u = intersection_and_union(p[b], t[b])
        assert torch.equal(ib[b], i) and torch.equal(ub[b], u)


def test_class_miou_accumulates_then_divides():
    # class 0 (id 3): two episodes; class 1 (id 4): one episode
    m = FewShotIoU([3, 4], episode_iou=True)
    # ep A (class 3): fg I=1, U=1  (perfect tiny object)
    m.update(T([[1, 0, 0, 0]]), T([[1, 0, 0, 0]]), 0)
    # ep B (class 3): fg I=1, U=3
    m.update(T([[1, 1, 0, 0]]), T([[1, 0, 1, 0]]), 0)
    # ep C (class 4): fg I=2, U=4 ; a 255 pixel predicted fg must not count
    m.update(T([[1, 1, 1, 0, 1]]), T([[1, 1, 0, 1, 255]]), 1)
    r = m.compute()
    assert r["class_iou"][3] == pytest.approx((1 + 1) / (1 + 3))  # not mean(1, 1/3)
    assert r["class_iou"][4] == pytest.approx(2 / 4)
    assert r["miou"] == pytest.approx((0.5 + 0.5) / 2)
    # FB-IoU: fg I=1+1+2=4, U=1+3+4=8 ; bg: A I=3 U=3 ; B I=1 U=3 ; C I=0 U=2
    assert r["fg_iou"] == pytest.approx(4 / 8)
    assert r["bg_iou"] == pytest.approx((3 + 1 + 0) / (3 + 3 + 2))
    assert r["fbiou"] == pytest.approx((0.5 + 0.5) / 2)
    # episode-wise: mean(1, 1/3, 1/2)
    assert r["episode_miou"] == pytest.approx((1 + 1 / 3 + 0.5) / 3)
    assert r["episodes"] == 3 and r["episodes_per_class"] == {3: 2, 4: 1}


def test_batched_update_with_class_indices():
    a = FewShotIoU([1, 2, 3])
    b = FewShotIoU([1, 2, 3])
    g = torch.Generator().manual_seed(1)
    p = torch.randint(0, 2, (4, 7, 7), generator=g)
    t = torch.randint(0, 2, (4, 7, 7), generator=g)
    t[:, 0] = 255
    ci = T([2, 0, 2, 1])
    a.update(p, t, ci)
    for k in range(4):
        b.update(p[k], t[k], int(ci[k]))
    ra, rb = a.compute(), b.compute()
    assert ra["class_iou"] == rb["class_iou"] and ra["fbiou"] == rb["fbiou"]


def test_class_without_episodes_is_nan_and_excluded(recwarn):
    m = FewShotIoU([1, 2])
    m.update(T([[1, 0]]), T([[1, 0]]), 0)
    with pytest.warns(RuntimeWarning, match="no episode"):
        r = m.compute()
    assert math.isnan(r["class_iou"][2])
    assert r["miou"] == pytest.approx(1.0)


def test_all_ignored_episode_counts_as_episode_with_zero_union():
    m = FewShotIoU([1], episode_iou=True)
    m.update(T([[1, 1]]), T([[255, 255]]), 0)
    r = m.compute()
    assert r["class_iou"][1] == 0.0 and r["episode_miou"] == 1.0 and r["episodes"] == 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="shapes differ"):
        intersection_and_union(T([[1, 0]]), T([[1, 0, 0]]))
    with pytest.raises(ValueError, match="target: values"):
        intersection_and_union(T([[1, 0]]), T([[1, 7]]))
    with pytest.raises(ValueError, match="pred: values"):
        intersection_and_union(T([[2, 0]]), T([[1, 0]]))
    with pytest.raises(TypeError, match="argmax"):
        intersection_and_union(torch.rand(2, 2), T([[1, 0], [0, 0]]))
    m = FewShotIoU([1, 2])
    with pytest.raises(ValueError, match="class_index"):
        m.update(T([[1, 0]]), T([[1, 0]]), 2)
    with pytest.raises(ValueError, match="one per episode"):
        m.update(torch.zeros(2, 1, 2, dtype=torch.long), torch.zeros(2, 1, 2, dtype=torch.long), [0])
