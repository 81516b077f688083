"""Preference pairs: loading from the Hub or local files, dropping ties, putting the winner first, and the
shared augmentation of both images of a pair."""

import io
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image


LOCAL_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


class DataError(ValueError):
    """Bad input data; the message is one line naming the dataset, the column or the row."""


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
        ds = datasets.load_dataset(builder, data_files=name_or_path, split="train", cache_dir=cache_dir)
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
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"could not load dataset '{name_or_path}': it is not a local file or folder, and loading it from the "
            f"Hub failed ({type(e).__name__}: {reason[:200]}); offline, pass a local path"
        ) from None


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


def drop_ties(dataset, columns: PairColumns, source: str):
    """Keeps rows whose ``label_0`` is 0 or 1; ties (0.5) are dropped and counted. Returns ``(dataset, num_ties)``."""
    labels = dataset[columns.label_0]
    keep, ties = [], 0
    for row, label in enumerate(labels):
        try:
            value = float(label)
        except (TypeError, ValueError):
            value = float("nan")
        if value == 0.5:
            ties += 1
        elif value in (0.0, 1.0):
            keep.append(row)
        else:
            raise DataError(
                f"dataset '{source}', row {row}: column '{columns.label_0}' is {label!r}; expected 0, 0.5 or 1"
            )
    if not keep:
        raise DataError(f"dataset '{source}' has no usable pair ({len(labels)} rows, {ties} ties)")
    return (dataset.select(keep) if len(keep) < len(labels) else dataset), ties


def to_pil(value, base_dir: str = ".", where: str = "") -> Image.Image:
    """An RGB image from JPEG/PNG bytes, a ``{"bytes", "path"}`` dict (datasets' Image storage), a path (absolute or
    relative to ``base_dir``), a numpy array or a PIL image."""
    try:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str):
            image = Image.open(value if os.path.isabs(value) else os.path.join(base_dir, value))
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(value)
        elif isinstance(value, Image.Image):
            image = value
        else:
            raise DataError(f"{where}: cannot read an image from a {type(value).__name__}")
        image.load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{where}: unreadable image ({type(e).__name__}: {e})") from None
    return image.convert("RGB")


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
    differs only in what the labeller judged."""

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
    ):
        self.dataset, self.columns, self.resolution = dataset, columns, resolution
        self.base_dir, self.source, self.random_crop, self.hflip = base_dir, source, random_crop, hflip
        self.seed, self.epoch = seed, 0  # the trainer sets epoch before each pass

    def augmentation_rng(self, index) -> random.Random:
        """Flips and crops are a function of (seed, epoch, row), not of a global stream: a resumed run, a prefetching
        loader and any number of workers all see the same augmentation."""
        return random.Random(f"{self.seed}/{self.epoch}/{index}")

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        row = self.dataset[index]
        c = self.columns
        winner_first = float(row[c.label_0]) == 1.0
        names = (c.image_0, c.image_1) if winner_first else (c.image_1, c.image_0)
        rng = self.augmentation_rng(index)
        flip = self.hflip and rng.random() < 0.5
        pixels, sizes, crops = [], [], []
        for name in names:
            image = to_pil(row[name], self.base_dir, f"dataset '{self.source}', row {index}, column '{name}'")
            sizes.append((image.height, image.width))
            image, crop = resize_and_crop(image, self.resolution, rng if self.random_crop else None, flip)
            pixels.append(to_tensor(image))
            crops.append(crop)
        caption = row[c.caption]
        if isinstance(caption, (list, tuple)):  # some datasets keep several captions per image
            caption = caption[0] if caption else ""
        return {
            "pixel_values": torch.stack(pixels),
            "caption": "" if caption is None else str(caption),
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
