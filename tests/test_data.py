"""Loading pairs from every supported source, ties, winner order, the shared augmentation, and every kind of bad
row (skipped and counted, or a one-line error)."""

import io
import json
import os
import random
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny import jpeg_bytes, tiny_pairs
from train_inversion_dpo import (
    DataError,
    PairColumns,
    PreferencePairs,
    check_columns,
    check_rows,
    load_pairs_dataset,
    raw_images,
    select_pairs,
    to_pil,
)


def solid(color, size=(40, 32)):
    return Image.new("RGB", size, color)


def asymmetric(size=32):
    a = np.full((size, size, 3), 255, np.uint8)
    a[:, : size // 4] = (200, 0, 0)  # a red band on the left: a flip is visible
    return Image.fromarray(a)


def pairs_of(path, max_bad_fraction=0.0, **kw):
    ds, base = load_pairs_dataset(path)
    cols = PairColumns(**kw)
    check_columns(ds, cols, path)
    ds = raw_images(ds, cols)
    check = check_rows(ds, cols, 32, base)
    ds = select_pairs(ds, cols, check, path, max_bad_fraction)
    return PreferencePairs(ds, cols, 32, base_dir=base, source=path, hflip=False, row_ids=check.keep), check.ties


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
    # one bad row of three is over any small --max_bad_fraction: the error names the first bad row and its column
    with pytest.raises(
        DataError, match=r"1 of 3 rows are bad .* row 1: column 'pref' is 2(\.0)?; expected 0, 0.5 or 1"
    ):
        pairs_of(str(tmp_path / "bad.jsonl"), image_0="a", image_1="b", label_0="pref", caption="prompt")
    # under the limit it is skipped: one pair left (row 0), row 2 is a tie
    pairs, ties = pairs_of(
        str(tmp_path / "bad.jsonl"), 0.5, image_0="a", image_1="b", label_0="pref", caption="prompt"
    )
    assert (len(pairs), ties) == (1, 1)
    with pytest.raises(DataError, match=r"no column 'jpg_0'.*--image_column_0"):
        pairs_of(str(tmp_path / "bad.jsonl"), label_0="pref", caption="prompt")
    with pytest.raises(DataError, match="is not one of"):
        load_pairs_dataset(str(tmp_path / "images" / "0a.png"))


def test_unreadable_image_names_row_column_and_file(tmp_path):
    records = write_image_folder(tmp_path)
    records[0]["a"] = "images/missing.png"
    with open(tmp_path / "p.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with pytest.raises(DataError, match=r"row 0: column 'a': unreadable image 'images/missing.png' \(FileNotFound"):
        pairs_of(str(tmp_path / "p.jsonl"), image_0="a", image_1="b", label_0="pref", caption="prompt")
    # a file that breaks after the check (deleted, rewritten) is a one-line error at training time, naming it
    pairs, _ = pairs_of(str(tmp_path / "p.jsonl"), 0.5, image_0="a", image_1="b", label_0="pref", caption="prompt")
    os.remove(tmp_path / "images" / "1b.jpg")
    with pytest.raises(DataError, match=r"row 1, column 'b': unreadable image 'images/1b.jpg'"):
        pairs[0]


def test_one_flip_is_shared_by_the_pair_and_follows_seed_and_epoch():
    import datasets

    img = asymmetric()
    ds = datasets.Dataset.from_dict(
        {"jpg_0": [img] * 16, "jpg_1": [img] * 16, "label_0": [1.0] * 16, "caption": ["c"] * 16},
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
    from train_inversion_dpo import resize_and_crop

    image = Image.new("RGB", (64, 32))  # resized to 64 x 32 at resolution 32: crops can start at x = 0 .. 32
    rng = random.Random(0)
    _, (top, left) = resize_and_crop(image, 32, rng)
    _, (top_f, left_f) = resize_and_crop(image, 32, random.Random(0), flip=True)
    assert top_f == top and left_f == 32 - left
    assert resize_and_crop(image, 32, None, flip=True)[1] == (0, 16)  # a centred crop stays centred


# ---------------------------------------------------------------------------------------------------------------
# Bad rows: each kind is skipped and counted under its reason (or, for the whole dataset, a one-line error)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png(width=100_000, height=100_000):
    """A valid PNG header claiming width x height pixels (PIL refuses it as a decompression bomb before decoding)."""
    data = bytearray(png_bytes(Image.new("L", (4, 4))))
    ihdr = bytearray(data[12:29])  # chunk type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def check_of(rows, resolution=32, max_pairs=None):
    import datasets

    ds = datasets.Dataset.from_dict(rows)
    return ds, check_rows(ds, PairColumns(), resolution, max_pairs=max_pairs)


def good_rows(n, start=0):
    rng = np.random.default_rng(start)
    return {
        "jpg_0": [jpeg_bytes(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))) for _ in range(n)],
        "jpg_1": [jpeg_bytes(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))) for _ in range(n)],
        "label_0": [float(i % 2) for i in range(n)],
        "caption": [f"caption {start + i}" for i in range(n)],
    }


def with_row(rows, **values):
    """The rows plus one more: a good row with ``values`` in place."""
    extra = good_rows(1, start=99)
    extra.update({k: [v] for k, v in values.items()})
    return {k: rows[k] + extra[k] for k in rows}


GOOD = jpeg_bytes(Image.new("RGB", (32, 32), "red"))
BAD_ROWS = {
    "truncated": ("jpg_0", GOOD[: len(GOOD) // 2], "bad_image", r"column 'jpg_0': unreadable image \(OSError"),
    "not an image": ("jpg_1", b"<html>404</html>", "bad_image", r"column 'jpg_1': unreadable image \(not an image"),
    "empty bytes": ("jpg_0", b"", "bad_image", "unreadable image"),
    "no image": ("jpg_0", None, "bad_image", "no image"),
    "tiny": ("jpg_0", png_bytes(Image.new("RGB", (7, 40))), "small_image", "7 x 40 pixels, under 8"),
    "huge": ("jpg_1", huge_png(), "large_image", r"column 'jpg_1': image too large \(.*decompression bomb"),
    "label 2": ("label_0", 2.0, "bad_label", r"column 'label_0' is 2.0; expected 0, 0.5 or 1"),
    "label -1": ("label_0", -1.0, "bad_label", "is -1.0"),
    "label nan": ("label_0", float("nan"), "bad_label", "is nan"),
    "label none": ("label_0", None, "bad_label", "is None"),
    "empty caption": ("caption", "  ", "bad_caption", r"column 'caption' is empty"),
    "missing caption": ("caption", None, "bad_caption", r"column 'caption' is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_each_bad_row_is_skipped_and_counted_under_its_reason(case):
    column, value, reason, message = BAD_ROWS[case]
    rows = with_row(good_rows(3), **{column: value})
    ds, check = check_of(rows)
    assert check.keep == [0, 1, 2] and check.ties == 0
    assert [(row, r) for row, r, _ in check.bad] == [(3, reason)]
    assert re.search(message, check.bad[0][2]), check.bad[0][2]
    counts = check.counts()
    assert counts["bad_rows"] == counts[reason] == 1 and counts["rows"] == 4 and counts["pairs"] == 3
    # past --max_bad_fraction (1 of 4 > 0.2) the same row is a one-line error naming row and column
    with pytest.raises(DataError, match=r"1 of 4 rows are bad \(25.0%.*--max_bad_fraction 0.2.*row 3: column"):
        select_pairs(ds, PairColumns(), check, "d", 0.2)
    assert len(select_pairs(ds, PairColumns(), check, "d", 0.25)) == 3


def test_a_dataset_with_no_usable_pair_is_one_line():
    rows = good_rows(2)
    rows["label_0"] = [0.5, 0.5]
    ds, check = check_of(rows)
    with pytest.raises(DataError, match=r"dataset 'd' has no usable pair \(2 rows: 2 ties, 0 bad\)"):
        select_pairs(ds, PairColumns(), check, "d", 1.0)
    rows["label_0"] = [0.5, 7]
    ds, check = check_of(rows)
    with pytest.raises(DataError, match=r"no usable pair \(2 rows: 1 ties, 1 bad\)"):
        select_pairs(ds, PairColumns(), check, "d", 1.0)


def mode_images():
    """Images in the modes a scraped dataset holds, each paired with the RGB it must become."""
    transparent = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red: white on a page
    half = Image.new("RGBA", (32, 32), (0, 0, 0, 128))  # half-transparent black over white: mid grey
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 1
    opaque_palette = palette.copy()
    del opaque_palette.info["transparency"]
    sixteen = Image.fromarray(np.full((32, 32), 65535 // 2, np.uint16))  # I;16 at half range
    int32 = Image.fromarray(np.full((32, 32), 65535, np.int32))  # I with 16-bit values
    floats = Image.fromarray(np.full((32, 32), 0.5, np.float32))  # F in [0, 1]
    return {
        "RGBA transparent": (transparent, (255, 255, 255)),
        "RGBA half": (half, (127, 127, 127)),
        "LA": (Image.new("LA", (32, 32), (0, 0)), (255, 255, 255)),
        "P transparent": (palette, (255, 255, 255)),
        "P": (opaque_palette, (10, 200, 30)),
        "L": (Image.new("L", (32, 32), 77), (77, 77, 77)),
        "1": (Image.new("1", (32, 32), 1), (255, 255, 255)),
        "CMYK": (Image.new("CMYK", (32, 32), (0, 255, 255, 0)), (255, 0, 0)),
        "I;16": (sixteen, (127, 127, 127)),
        "I": (int32, (255, 255, 255)),
        "F": (floats, (128, 128, 128)),
    }


@pytest.mark.parametrize("mode", sorted(mode_images()))
def test_every_mode_becomes_the_right_rgb(mode):
    image, rgb = mode_images()[mode]
    encoded = {"F": "TIFF", "CMYK": "JPEG", "I": "TIFF"}.get(mode, "PNG")
    buffer = io.BytesIO()
    image.save(buffer, format=encoded, **({"quality": 100} if encoded == "JPEG" else {}))
    for value in (image, buffer.getvalue()):  # decoded by datasets, or bytes as stored
        out = to_pil(value)
        assert out.mode == "RGB" and out.size == (32, 32)
        assert np.abs(np.asarray(out, np.int16) - np.array(rgb)).max() <= 2, (mode, out.getpixel((0, 0)))
    # and a row with it trains
    _, check = check_of(with_row(good_rows(1), jpg_0=buffer.getvalue()))
    assert check.keep == [0, 1]


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 32), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 32 wide, 40 high
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert to_pil(buffer.getvalue()).size == (32, 40)


def test_max_train_samples_checks_only_as_many_rows_as_it_needs():
    rows = with_row(good_rows(2), label_0=3.0)  # row 2 is bad
    rows = {k: rows[k] + good_rows(300, start=10)[k] for k in rows}
    ds, check = check_of(rows, max_pairs=3)
    assert check.keep == [0, 1, 3] and [b[0] for b in check.bad] == [2]
    assert check.rows == 256  # one chunk, not all 303 rows
    _, check = check_of(rows)
    assert len(check.keep) == 302 and check.rows == 303


def test_a_broken_image_column_from_datasets_is_counted_not_raised(tmp_path):
    """datasets would raise while decoding an Image column; raw_images leaves the bytes to the row check."""
    import datasets

    ds = datasets.Dataset.from_dict(
        {"jpg_0": [{"bytes": GOOD, "path": None}, {"bytes": b"junk", "path": None}], "jpg_1": [solid("red")] * 2,
         "label_0": [1.0, 0.0], "caption": ["a", "b"]},
        features=datasets.Features({"jpg_0": datasets.Image(), "jpg_1": datasets.Image(),
                                    "label_0": datasets.Value("float32"), "caption": datasets.Value("string")}),
    )  # fmt: skip
    ds.save_to_disk(str(tmp_path / "saved"))
    loaded, base = load_pairs_dataset(str(tmp_path / "saved"))
    loaded = raw_images(loaded, PairColumns())
    check = check_rows(loaded, PairColumns(), 32, base)
    assert check.keep == [0] and [(b[0], b[1]) for b in check.bad] == [(1, "bad_image")]


def test_an_empty_or_corrupt_dataset_file_is_one_line_naming_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = tmp_path / "empty.parquet"
    schema = pa.schema(
        [("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()), ("caption", pa.string())]
    )
    pq.write_table(schema.empty_table(), empty)
    with pytest.raises(DataError, match=r"dataset file '.*empty\.parquet' has no rows"):
        load_pairs_dataset(str(empty))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match=r"could not read dataset file '.*corrupt\.parquet' as parquet") as e:
        load_pairs_dataset(str(corrupt))
    assert "\n" not in str(e.value)
