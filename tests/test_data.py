"""Loading pairs from every supported source, ties, winner order, and the shared augmentation."""

import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from inversion_dpo.data import (
    DataError,
    PairColumns,
    PreferencePairs,
    check_columns,
    drop_ties,
    load_pairs_dataset,
    to_pil,
)
from inversion_dpo.tiny import tiny_pairs


def solid(color, size=(40, 32)):
    return Image.new("RGB", size, color)


def asymmetric(size=32):
    a = np.full((size, size, 3), 255, np.uint8)
    a[:, : size // 4] = (200, 0, 0)  # a red band on the left: a flip is visible
    return Image.fromarray(a)


def pairs_of(path, **kw):
    ds, base = load_pairs_dataset(path)
    cols = PairColumns(**kw)
    check_columns(ds, cols, path)
    ds, ties = drop_ties(ds, cols, path)
    return PreferencePairs(ds, cols, 32, base_dir=base, source=path, hflip=False), ties


def test_parquet_with_bytes_drops_ties_and_puts_the_winner_first(tiny_pairs_parquet):
    pairs, ties = pairs_of(tiny_pairs_parquet)
    assert ties == 2 and len(pairs) == 6
    rows = tiny_pairs(num_rows=8, tie_every=4)
    kept = [i for i, label in enumerate(rows["label_0"]) if label != 0.5]
    for item, row in zip(pairs, kept):
        winner = rows["jpg_0"] if rows["label_0"][row] == 1 else rows["jpg_1"]
        expected = np.asarray(to_pil(winner[row]).resize((32, 32), Image.BICUBIC), np.float32) / 127.5 - 1
        assert np.allclose(item["pixel_values"][0].permute(1, 2, 0).numpy(), expected, atol=1e-5)
        assert item["caption"] == rows["caption"][row]
        assert item["pixel_values"].shape == (2, 3, 32, 32)


def write_image_folder(folder):
    os.makedirs(folder / "images", exist_ok=True)
    records = []
    for i, (w, l, label) in enumerate([("red", "blue", 1), ("green", "white", 0), ("black", "gray", 0.5)]):
        solid(w).save(folder / "images" / f"{i}a.png")
        solid(l).save(folder / "images" / f"{i}b.jpg")
        records.append({"a": f"images/{i}a.png", "b": f"images/{i}b.jpg", "pref": label, "prompt": f"pair {i}"})
    return records


def test_jsonl_and_csv_with_relative_paths(tmp_path):
    records = write_image_folder(tmp_path)
    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    import pandas as pd

    pd.DataFrame(records).to_csv(tmp_path / "pairs.csv", index=False)
    for name in ("pairs.jsonl", "pairs.csv"):
        pairs, ties = pairs_of(str(tmp_path / name), image_0="a", image_1="b", label_0="pref", caption="prompt")
        assert ties == 1 and len(pairs) == 2
        # label 0: the second image (white) wins and goes first
        item = pairs[1]
        assert torch.allclose(item["pixel_values"][0], torch.ones(3, 32, 32))
        assert item["original_sizes"].tolist() == [[32, 40], [32, 40]]


def test_save_to_disk_with_decoded_images_and_a_folder_of_parquet(tmp_path, tiny_pairs_parquet):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"jpg_0": [solid("red")], "jpg_1": [solid("blue")], "label_0": [0.0], "caption": ["c"]},
        features=datasets.Features(
            {
                "jpg_0": datasets.Image(),
                "jpg_1": datasets.Image(),
                "label_0": datasets.Value("float32"),
                "caption": datasets.Value("string"),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    pairs, _ = pairs_of(str(tmp_path / "saved"))
    assert pairs[0]["pixel_values"][0, 2].mean() > 0.5  # blue won

    folder = tmp_path / "shards"
    folder.mkdir()
    os.link(tiny_pairs_parquet, folder / "train-0000.parquet")
    pairs, ties = pairs_of(str(folder))
    assert (len(pairs), ties) == (6, 2)


def test_bad_labels_and_missing_columns_name_the_problem(tmp_path):
    records = write_image_folder(tmp_path)
    records[1]["pref"] = 2
    with open(tmp_path / "bad.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with pytest.raises(DataError, match=r"row 1: column 'pref' is 2"):
        pairs_of(str(tmp_path / "bad.jsonl"), image_0="a", image_1="b", label_0="pref", caption="prompt")
    with pytest.raises(DataError, match=r"no column 'jpg_0'.*--image_column_0"):
        pairs_of(str(tmp_path / "bad.jsonl"), label_0="pref", caption="prompt")
    with pytest.raises(DataError, match="is not one of"):
        load_pairs_dataset(str(tmp_path / "images" / "0a.png"))


def test_unreadable_image_names_row_and_column(tmp_path):
    records = write_image_folder(tmp_path)
    records[0]["a"] = "images/missing.png"
    with open(tmp_path / "p.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    pairs, _ = pairs_of(str(tmp_path / "p.jsonl"), image_0="a", image_1="b", label_0="pref", caption="prompt")
    with pytest.raises(DataError, match=r"row 0, column 'a': unreadable image"):
        pairs[0]


def test_one_flip_is_shared_by_the_pair_and_follows_seed_and_epoch():
    import datasets

    img = asymmetric()
    ds = datasets.Dataset.from_dict(
        {"jpg_0": [img] * 16, "jpg_1": [img] * 16, "label_0": [1.0] * 16, "caption": [""] * 16},
        features=datasets.Features(
            {
                "jpg_0": datasets.Image(),
                "jpg_1": datasets.Image(),
                "label_0": datasets.Value("float32"),
                "caption": datasets.Value("string"),
            }
        ),
    )
    pairs = PreferencePairs(ds, PairColumns(), 32, hflip=True, seed=3)
    flips = []
    for i in range(16):
        px = pairs[i]["pixel_values"]
        assert torch.equal(px[0], px[1])  # both images got the same flip
        flips.append(bool(px[0, 1, 0, 0] > 0))  # green is high on the left: the red band moved right
        assert torch.equal(pairs[i]["pixel_values"], px)  # deterministic for (seed, epoch, row)
    assert 0 < sum(flips) < 16
    pairs.epoch = 1
    assert [
        bool(pairs[i]["pixel_values"][0, 0, 0, -1] > pairs[i]["pixel_values"][0, 0, 0, 0]) for i in range(16)
    ] != flips
    assert (
        PreferencePairs(ds, PairColumns(), 32, hflip=False)[0]["pixel_values"][0, 1, 0, 0] < 0
    )  # red band stays left


def test_imagefolder_with_pair_metadata(tmp_path):
    # datasets turns metadata columns named <column>_file_name into image columns
    for i in range(3):
        solid("red").save(tmp_path / f"{i}a.png")
        solid("blue").save(tmp_path / f"{i}b.png")
    with open(tmp_path / "metadata.jsonl", "w") as f:
        for i, label in enumerate([0, 0.5, 1]):
            row = {"jpg_0_file_name": f"{i}a.png", "jpg_1_file_name": f"{i}b.png", "label_0": label, "caption": "c"}
            f.write(json.dumps(row) + "\n")
    pairs, ties = pairs_of(str(tmp_path))
    assert (len(pairs), ties) == (2, 1)
    assert pairs[0]["pixel_values"][0, 2].mean() > 0.5  # label 0: blue first
    assert pairs[1]["pixel_values"][0, 0].mean() > 0.5  # label 1: red first


def test_crop_corner_is_mirrored_with_the_flip():
    from inversion_dpo.data import resize_and_crop

    image = Image.new("RGB", (64, 32))  # resized to 64 x 32 at resolution 32: crops can start at x = 0 .. 32
    rng = random.Random(0)
    _, (top, left) = resize_and_crop(image, 32, rng)
    _, (top_f, left_f) = resize_and_crop(image, 32, random.Random(0), flip=True)
    assert top_f == top and left_f == 32 - left
    assert resize_and_crop(image, 32, None, flip=True)[1] == (0, 16)  # a centred crop stays centred
