"""FSS-1000 (HSNet layout and protocol, docs/PROTOCOLS.md#fss-1000) on a tiny fake folder."""
import numpy as np
import pytest
from PIL import Image

from benchmarks.datasets import FSS1000, DatasetError
from benchmarks.datasets.transforms import test_transform

CLASSES = ["zebra", "apple", "car"]
FILES = ["1", "2", "3", "10"]


def _fake_fss(tmp_path):
    root = tmp_path / "FSS-1000"
    for ci, cname in enumerate(CLASSES):
        d = root / cname
        d.mkdir(parents=True)
        for fi, f in enumerate(FILES):
            Image.fromarray(np.full((20, 24, 3), 10 * ci + fi, np.uint8)).save(d / f"{f}.jpg")
            m = np.zeros((20, 24), np.uint8)
            m[:, :12] = 255
            m[0, 0] = 127   # below the 128 threshold -> background
            m[0, 20] = 128  # at the threshold -> foreground
            Image.fromarray(m).convert("RGB").save(d / f"{f}.png")  # FSS masks are often RGB
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "test.txt").write_text("zebra\napple\ncar\n")
    (splits / "trn.txt").write_text("car\n")
    return root, splits


def test_fss_episodes_follow_hsnet(tmp_path):
    root, splits = _fake_fss(tmp_path)
    ds = FSS1000(root, splits / "test.txt", split="test", shot=2, seed=0, transform=test_transform(16, "squash"))
    # one episode per image: classes sorted by name, files in sorted (lexicographic) order
    assert len(ds) == 12
    assert [n for n, _ in ds.queries] == [f"{c}/{f}" for c in sorted(CLASSES) for f in sorted(FILES)]
    assert ds.class_ids == [761, 762, 763] and ds.class_names[761] == "apple"  # HSNet test ids 760.. (+1)
    for i, e in enumerate(ds.episodes):
        assert e.query == ds._queries[i][0]
        qc = ds.image_names[e.query].split("/")[0]
        names = [ds.image_names[s] for s in e.supports]
        assert all(n.split("/")[0] == qc for n in names) and ds.image_names[e.query] not in names
        assert len(set(names)) == 2
    rec = ds[0]
    assert rec["query_img"].shape == (3, 16, 16) and rec["support_masks"].shape == (2, 16, 16)
    lab = rec["query_label_orig"]
    assert lab.shape == (20, 24) and int(lab[0, 0]) == 0 and int(lab[0, 20]) == 1 and int(lab[5, 5]) == 1
    assert int(lab[5, 15]) == 0 and set(lab.unique().tolist()) == {0, 1}


def test_fss_split_dir_and_train(tmp_path):
    root, splits = _fake_fss(tmp_path)
    ds = FSS1000(root, splits, split="train", transform=test_transform(16, "squash"))
    assert ds.class_ids == [1] and ds.class_names[1] == "car" and ds.training
    assert ds[0]["query_mask"].shape == (16, 16)


def test_fss_default_transform_is_hsnet_400(tmp_path):
    root, splits = _fake_fss(tmp_path)
    ds = FSS1000(root, splits / "test.txt", episodes=1)
    assert ds[0]["query_img"].shape == (3, 400, 400)


def test_fss_bad_input(tmp_path):
    root, splits = _fake_fss(tmp_path)
    (splits / "val.txt").write_text("apple\nunicorn\n")
    with pytest.raises(DatasetError, match=r"class folder '.*unicorn' does not exist"):
        FSS1000(root, splits, split="val")
    (root / "car" / "3.png").unlink()
    with pytest.raises(DatasetError, match=r"mask '.*car/3.png' for image"):
        FSS1000(root, splits / "test.txt")
    with pytest.raises(DatasetError, match="not a directory"):
        FSS1000(tmp_path / "missing", splits / "test.txt")
    with pytest.raises(DatasetError, match="list file not found"):
        FSS1000(root, splits / "nope.txt")
