"""Preference pairs: loading from the Hub or local files, checking every row once (ties dropped, bad rows skipped
and counted), putting the winner first, and the shared augmentation of both images of a pair."""

import io
import math
import os
import random
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps


LOCAL_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


class DataError(ValueError):
    """Bad input data; the message is one line naming the dataset, the column or the row."""


def first_line(error: Exception, limit: int = 200) -> str:
    """An exception's message cut to its first line, for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


@dataclass
class PairColumns:
    image_0: str = "jpg_0"
    image_1: str = "jpg_1"
    label_0: str = "label_0"
    caption: str = "caption"


def load_pairs_dataset(name_or_path: str, config_name=None, split: str = "train", cache_dir=None):
    """Loads a Hub id or a local path (parquet/json/jsonl/csv file, a folder of such files or an imagefolder with
    metadata, or a ``save_to_disk`` folder). Returns ``(dataset, base_dir)``; relative image paths resolve
    against ``base_dir``."""
    import datasets

    if os.path.isfile(name_or_path):
        builder = LOCAL_FORMATS.get(os.path.splitext(name_or_path)[1].lower())
        if builder is None:
            raise DataError(f"dataset file '{name_or_path}' is not one of {sorted(LOCAL_FORMATS)}")
        try:
            ds = datasets.load_dataset(builder, data_files=name_or_path, split="train", cache_dir=cache_dir)
        except Exception as e:  # an empty or unreadable file surfaces as datasets' generation error
            if builder == "parquet" and _parquet_rows(name_or_path) == 0:
                raise DataError(f"dataset file '{name_or_path}' has no rows") from None
            cause = e.__cause__ or e
            raise DataError(
                f"could not read dataset file '{name_or_path}' as {builder} "
                f"({type(cause).__name__}: {first_line(cause)})"
            ) from None
        return ds, os.path.dirname(os.path.abspath(name_or_path))
    if os.path.isdir(name_or_path):
        base_dir = os.path.abspath(name_or_path)
        if any(os.path.exists(os.path.join(name_or_path, f)) for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(name_or_path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"dataset '{name_or_path}' has no split '{split}' (splits: {list(ds)})")
                ds = ds[split]
            return ds, base_dir
        return datasets.load_dataset(name_or_path, config_name, split=split, cache_dir=cache_dir), base_dir
    try:
        return datasets.load_dataset(name_or_path, config_name, split=split, cache_dir=cache_dir), os.getcwd()
    except Exception as e:  # datasets raises many kinds here; all mean the same to a user
        raise DataError(
            f"could not load dataset '{name_or_path}': it is not a local file or folder, and loading it from the "
            f"Hub failed ({type(e).__name__}: {first_line(e)}); offline, pass a local path"
        ) from None


def _parquet_rows(path: str):
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    except Exception:
        return None


def check_columns(dataset, columns: PairColumns, source: str):
    missing = [c for c in vars(columns).values() if c not in dataset.column_names]
    if missing:
        flags = {
            v: "--"
            + k.replace("image_", "image_column_")
            .replace("label_0", "label_column")
            .replace("caption", "caption_column")
            for k, v in vars(columns).items()
        }
        raise DataError(
            f"dataset '{source}' has no column '{missing[0]}' (columns: {', '.join(dataset.column_names)}); "
            f"name the right one with {flags[missing[0]]}"
        )


# a row is skipped (and counted under this reason) when it cannot make a training pair
BAD_REASONS = ("bad_label", "bad_caption", "bad_image", "small_image", "large_image")
# an image whose shorter side is under resolution / MIN_SIDE_DIVISOR would be upscaled past recognition
MIN_SIDE_DIVISOR = 4


class BadRow(ValueError):
    """One row that cannot be used; ``reason`` is one of BAD_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_label(value) -> float:
    """``label_0`` as 0.0, 0.5 or 1.0; anything else raises BadRow."""
    try:
        label = float(value)
    except (TypeError, ValueError):
        label = math.nan
    if label not in (0.0, 0.5, 1.0):
        raise BadRow("bad_label", f"is {value!r}; expected 0, 0.5 or 1")
    return label


def parse_caption(value) -> str:
    """The caption as a string (the first of a list); a missing or blank one raises BadRow: a pair trained on the
    empty prompt would teach a preference to the unconditional model that classifier-free guidance subtracts."""
    if isinstance(value, (list, tuple)):  # some datasets keep several captions per image
        value = value[0] if value else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise BadRow("bad_caption", "is missing")
    caption = str(value)
    if not caption.strip():
        raise BadRow("bad_caption", "is empty")
    return caption


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode PIL decodes: EXIF rotation applied, transparency (RGBA, LA, palette with a transparent
    colour) composited on white rather than dropped to black, 16/32-bit integer and float greyscale scaled to 8 bits,
    CMYK and the rest through PIL's conversion."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and array.max(initial=0.0) <= 1.0:
            array = array * 255.0  # floats in [0, 1]
        elif image.mode.startswith("I;16") or array.max(initial=0.0) > 255:
            array = array / 257.0  # 16-bit range onto 8 bits
        image = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def to_pil(value, base_dir: str = ".", where: str = "") -> Image.Image:
    """An RGB image (see ``to_rgb``) from JPEG/PNG/... bytes, a ``{"bytes", "path"}`` dict (datasets' Image
    storage), a path (absolute or relative to ``base_dir``), a numpy array or a PIL image. Raises DataError naming
    ``where`` (and the file) when it cannot be read, is truncated, or is larger than PIL's decompression-bomb limit."""
    try:
        return decode_image(value, base_dir)
    except BadRow as e:
        raise DataError(f"{where}: {e}") from None


def decode_image(value, base_dir: str = ".") -> Image.Image:
    """``to_pil`` raising BadRow ("bad_image" or "large_image") instead of DataError."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    name = ""
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and refuses above twice that: both are a skipped row here, before
            # any pixel is decoded
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(value, (bytes, bytearray)):
                image = Image.open(io.BytesIO(value))
            elif isinstance(value, str):
                name = f" '{value}'"
                image = Image.open(value if os.path.isabs(value) else os.path.join(base_dir, value))
            elif isinstance(value, np.ndarray):
                image = Image.fromarray(value)
            elif isinstance(value, Image.Image):
                image = value
            elif value is None:
                raise BadRow("bad_image", "no image (empty value)")
            else:
                raise BadRow("bad_image", f"cannot read an image from a {type(value).__name__}")
            image.load()
            return to_rgb(image)
    except BadRow:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadRow("large_image", f"image{name} too large ({e})") from None
    except Image.UnidentifiedImageError:
        raise BadRow("bad_image", f"unreadable image{name} (not an image format PIL can decode)") from None
    except Exception as e:
        raise BadRow("bad_image", f"unreadable image{name} ({type(e).__name__}: {e})") from None


def check_row(row: dict, columns: "PairColumns", base_dir: str, min_side: int) -> float:
    """Checks one row as training will read it (label, caption, both images decoded in full). Returns the label;
    raises BadRow whose message names the column."""
    where = ""
    try:
        where = f"column '{columns.label_0}' "
        label = parse_label(row[columns.label_0])
        if label == 0.5:
            return label
        where = f"column '{columns.caption}' "
        parse_caption(row[columns.caption])
        for name in (columns.image_0, columns.image_1):
            where = f"column '{name}': "
            image = decode_image(row[name], base_dir)
            if min(image.size) < min_side:
                raise BadRow("small_image", f"image of {image.width} x {image.height} pixels, under {min_side}")
    except BadRow as e:
        raise BadRow(e.reason, where + str(e)) from None
    return label


@dataclass
class RowCheck:
    """What checking a dataset's rows found: the rows to train on, the ties and the skipped rows."""

    keep: List[int] = field(default_factory=list)
    ties: int = 0
    bad: List[Tuple[int, str, str]] = field(default_factory=list)  # (row, reason, message)
    rows: int = 0  # rows checked

    def counts(self) -> Dict[str, int]:
        out = {"rows": self.rows, "ties_dropped": self.ties, "bad_rows": len(self.bad)}
        out.update({reason: sum(b[1] == reason for b in self.bad) for reason in BAD_REASONS})
        out["pairs"] = len(self.keep)
        return out


def _check_batch(batch, columns, base_dir, min_side):
    status, message = [], []
    for k in range(len(next(iter(batch.values())))):
        try:
            label = check_row({name: batch[name][k] for name in batch}, columns, base_dir, min_side)
            status.append("tie" if label == 0.5 else "ok")
            message.append("")
        except BadRow as e:
            status.append(e.reason)
            message.append(str(e))
    return {"status": status, "message": message}


def check_rows(
    dataset,
    columns: PairColumns,
    resolution: int,
    base_dir: str = ".",
    max_pairs: Optional[int] = None,
    num_proc: Optional[int] = None,
) -> RowCheck:
    """Decodes every row once, before training, so that training never meets a bad row and a resumed run sees the
    same rows (datasets caches the result for file-backed datasets). With ``max_pairs``, rows are checked in chunks
    from the top until that many pairs are found."""
    check = RowCheck()
    min_side = max(1, resolution // MIN_SIDE_DIVISOR)
    start = 0
    while start < len(dataset) and (max_pairs is None or len(check.keep) < max_pairs):
        stop = len(dataset) if max_pairs is None else min(len(dataset), start + max(max_pairs - len(check.keep), 256))
        chunk = dataset if (start, stop) == (0, len(dataset)) else dataset.select(range(start, stop))
        result = chunk.map(
            _check_batch,
            batched=True,
            remove_columns=chunk.column_names,
            num_proc=num_proc if num_proc and len(chunk) > num_proc else None,
            fn_kwargs={"columns": columns, "base_dir": base_dir, "min_side": min_side},
            desc="checking rows",
        )
        for i, (status, message) in enumerate(zip(result["status"], result["message"])):
            row = start + i
            if status == "ok":
                if max_pairs is None or len(check.keep) < max_pairs:
                    check.keep.append(row)
            elif status == "tie":
                check.ties += 1
            else:
                check.bad.append((row, status, message))
        start = stop
    check.rows = start
    return check


def select_pairs(dataset, columns: PairColumns, check: RowCheck, source: str, max_bad_fraction: float):
    """The usable rows of ``dataset``; a one-line DataError when too many rows are bad or none is usable."""
    if check.bad and len(check.bad) > max_bad_fraction * check.rows:
        row, _, message = check.bad[0]
        raise DataError(
            f"dataset '{source}': {len(check.bad)} of {check.rows} rows are bad "
            f"({100 * len(check.bad) / check.rows:.1f}%, more than --max_bad_fraction {max_bad_fraction:g}); "
            f"the first, row {row}: {message}"
        )
    if not check.keep:
        raise DataError(
            f"dataset '{source}' has no usable pair ({check.rows} rows: {check.ties} ties, {len(check.bad)} bad)"
        )
    return dataset.select(check.keep) if len(check.keep) < len(dataset) else dataset


def raw_images(dataset, columns: PairColumns):
    """The dataset with its image columns left undecoded, so that a broken image reaches ``decode_image`` (and is
    counted) instead of failing inside datasets."""
    import datasets

    for name in (columns.image_0, columns.image_1):
        if isinstance(dataset.features.get(name), datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def resize_and_crop(image: Image.Image, resolution: int, rng: Optional[random.Random] = None, flip: bool = False):
    """Resizes the shorter side to ``resolution``, crops a square and optionally mirrors it. Returns the crop and its
    top-left corner (y, x) in the resized image as SDXL's time ids need it: after a flip, the corner of the mirrored
    crop within the mirrored image."""
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    if rng is not None:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    else:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    crop = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        return crop.transpose(Image.FLIP_LEFT_RIGHT), (top, new_w - resolution - left)
    return crop, (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class PreferencePairs(torch.utils.data.Dataset):
    """Items: ``pixel_values`` [2, 3, R, R] (winner, loser), ``caption``, ``original_sizes`` [2, 2] (h, w) and
    ``crop_top_lefts`` [2, 2] (y, x). One horizontal flip is shared by both images of a pair, so the pair still
    differs only in what the labeller judged. Rows are expected to have passed ``check_rows``; ``row_ids`` are their
    numbers in the source, for error messages."""

    def __init__(
        self,
        dataset,
        columns: PairColumns,
        resolution: int,
        base_dir: str = ".",
        source: str = "",
        random_crop: bool = False,
        seed: int = 0,
        hflip: bool = False,
        row_ids: Optional[List[int]] = None,
    ):
        self.dataset, self.columns, self.resolution = dataset, columns, resolution
        self.base_dir, self.source, self.random_crop, self.hflip = base_dir, source, random_crop, hflip
        self.seed, self.epoch = seed, 0  # the trainer sets epoch before each pass
        self.row_ids = row_ids

    def augmentation_rng(self, index) -> random.Random:
        """Flips and crops are a function of (seed, epoch, row), not of a global stream: a resumed run, a prefetching
        loader and any number of workers all see the same augmentation."""
        return random.Random(f"{self.seed}/{self.epoch}/{index}")

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        rng = self.augmentation_rng(index)
        return self.load(index, self.draw_flip(rng), rng)

    def draw_flip(self, rng: random.Random) -> bool:
        """The pair's shared flip: the first draw of its augmentation stream (a cache picks its stored flip so)."""
        return self.hflip and rng.random() < 0.5

    def load(self, index, flip: bool, rng: Optional[random.Random] = None):
        """Pair ``index`` with the given flip; ``rng`` draws the random crop (center crop without it)."""
        row = self.dataset[index]
        c = self.columns
        where = f"dataset '{self.source}', row {index if self.row_ids is None else self.row_ids[index]}"
        try:  # a row that passed check_rows fails here only if its files changed since
            winner_first = parse_label(row[c.label_0]) == 1.0
            caption = parse_caption(row[c.caption])
        except BadRow as e:
            raise DataError(f"{where}: {e}") from None
        names = (c.image_0, c.image_1) if winner_first else (c.image_1, c.image_0)
        pixels, sizes, crops = [], [], []
        for name in names:
            image = to_pil(row[name], self.base_dir, f"{where}, column '{name}'")
            sizes.append((image.height, image.width))
            image, crop = resize_and_crop(image, self.resolution, rng if self.random_crop else None, flip)
            pixels.append(to_tensor(image))
            crops.append(crop)
        return {
            "pixel_values": torch.stack(pixels),
            "caption": caption,
            "original_sizes": torch.tensor(sizes),
            "crop_top_lefts": torch.tensor(crops),
        }


def collate_pairs(items):
    return {
        "pixel_values": torch.stack([i["pixel_values"] for i in items]),  # [B, 2, 3, R, R]
        "captions": [i["caption"] for i in items],
        "original_sizes": torch.stack([i["original_sizes"] for i in items]),  # [B, 2, 2]
        "crop_top_lefts": torch.stack([i["crop_top_lefts"] for i in items]),  # [B, 2, 2]
    }
