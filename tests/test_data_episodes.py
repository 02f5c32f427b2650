"""Episode construction: determinism across workers/batch sizes, K distinct supports, training epochs, collate."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks import collate_episodes
from benchmarks.datasets import SyntheticFewShot, build_dataset
from benchmarks.datasets.transforms import train_transform


def _val(**kw):
    kw = {"fold": 0, "split": "val", "num_images": 80, "image_size": 32, "episodes": 12, "seed": 7, **kw}
    return SyntheticFewShot(**kw)


def _run(ds, batch_size, num_workers):
    dl = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_episodes)
    out = {"query_img": [], "query_mask": [], "support_imgs": [], "support_masks": [], "class_id": [], "names": []}
    for b in dl:
        for k in ("query_img", "query_mask", "support_imgs", "support_masks", "class_id"):
            out[k].append(b[k])
        out["names"] += b.get("query_name", [])
    return {k: (torch.cat(v) if k != "names" else v) for k, v in out.items()}


@pytest.mark.parametrize("split", ["val", "train"])
def test_identical_across_workers_and_batch_sizes(split):
    kw = dict(shot=2)
    if split == "train":
        kw.update(split="train", transform=train_transform(crop_size=24, scale=(0.8, 1.2)), episodes=10,
                  num_images=200)
    ds = _val(**kw)
    ref = _run(ds, 1, 0)
    for bs, nw in ((3, 0), (4, 2)):
        got = _run(_val(**kw), bs, nw)
        for k in ref:
            if k == "names":
                assert got[k] == ref[k]
            else:
                assert torch.equal(got[k], ref[k]), (k, bs, nw)


def test_episode_list_is_pure_function_of_seed_and_index():
    a, b = _val(episodes=30), _val(episodes=12)
    assert a.episodes[:12] == b.episodes  # a longer list extends, never reshuffles
    assert _val(image_size=48).episodes == b.episodes  # independent of the transform / input size
    assert _val(seed=8).episodes != b.episodes


def test_supports_distinct_not_query_and_class_present():
    ds = _val(shot=5, episodes=40, num_images=200)
    for e in ds.episodes:
        assert len(set(e.supports)) == 5 and e.query not in e.supports
        for idx in (e.query,) + e.supports:
            _, lab = ds.render(idx)
            assert (lab == e.class_id).any()


def test_sequential_cycles_queries_in_order_and_class_balanced_spreads_classes():
    ds = _val(episodes=200, num_images=100)
    q = [e.query for e in ds.episodes]
    order = [i for i, _ in ds._queries]
    assert q == [order[k % len(order)] for k in range(200)]
    cb = _val(episodes=500, num_images=100, sampling="class_balanced")
    counts = np.bincount([e.class_id for e in cb.episodes], minlength=6)[1:]
    assert counts.min() > 60  # ~100 per class


def test_pool_too_small_for_k():
    with pytest.raises(ValueError, match=r"class \d+ \(.*\) has \d support image\(s\)(.|\n)*10-shot"):
        _val(num_images=20, shot=10)
    with pytest.raises(ValueError, match="no query image has an episode class with a large enough support pool"):
        _val(num_images=20, shot=10, on_small_pool="skip")


def test_training_epochs_are_seedable():
    kw = dict(fold=0, split="train", num_images=200, image_size=32, seed=3)
    a, b = SyntheticFewShot(**kw), SyntheticFewShot(**kw)
    assert a.episodes == b.episodes and len(a) == len(a.queries)
    e0 = a.episodes
    a.set_epoch(1)
    assert a.episodes != e0
    b.set_epoch(1)
    assert a.episodes == b.episodes
    assert torch.equal(a[2]["query_img"], b[2]["query_img"])
    a.set_epoch(0)
    assert a.episodes == e0
    assert "query_label_orig" not in a[0] and "query_name" not in a[0]  # eval-only keys (CONTRACTS.md)
    # each pass visits every query once (shuffled)
    assert sorted(e.query for e in e0) == sorted(i for i, _ in a._queries)


def test_collate_keeps_original_labels_as_list_and_rejects_ragged_batches():
    ds = _val(shot=2)
    b = collate_episodes([ds[0], ds[1], ds[2]])
    assert b["query_img"].shape == (3, 3, 32, 32) and b["support_masks"].shape == (3, 2, 32, 32)
    assert b["class_id"].dtype == torch.long and b["class_index"].tolist() == [ds[i]["class_index"] for i in range(3)]
    assert isinstance(b["query_label_orig"], list) and len(b["query_label_orig"]) == 3
    assert isinstance(b["support_names"], list) and len(b["support_names"][0]) == 2
    r = dict(ds[0])
    r["query_img"] = torch.zeros(3, 40, 40)
    with pytest.raises(ValueError, match="'query_img' shapes differ"):
        collate_episodes([ds[1], r])
    with pytest.raises(ValueError, match="empty batch"):
        collate_episodes([])


def test_argument_validation_names_the_argument():
    for kw, name in (({"shot": 0}, "shot"), ({"seed": -1}, "seed"), ({"split": "dev"}, "split"),
                     ({"episodes": 0}, "episodes"), ({"sampling": "random"}, "sampling")):
        with pytest.raises(ValueError, match=name):
            _val(**kw)
    with pytest.raises(ValueError, match="dataset: expected one of"):
        build_dataset("imagenet")
    with pytest.raises(IndexError):
        _val().episode(12)
