"""The reference side of ``inversion_dpo``, computed once per dataset and stored (``--inversion_cache DIR``).

Everything the policy needs from the frozen reference (method.md, "Costs") depends only on the reference and the
data: the trajectory inputs ``x_i``, the targets ``tau_i`` and the reference's errors ``||tau_i - eps_ref||^2`` (the
reference target stores ``eps_ref`` itself), and the UNet's conditioning. With them stored, a training step runs
the policy alone: no VAE encode, no text encoder, no inversion, no reference pass.

Layout: ``DIR/<key hash>/cache.json`` holds the key (model, data, inversion settings) in full, and
``shard-NNNNN.safetensors`` the pairs ``[s * shard_size, (s + 1) * shard_size)``. Each process of an ``accelerate
launch`` builds the shards ``s % num_processes == process_index`` that are missing and writes each to a temporary
file renamed when complete, so an interrupted build resumes where it stopped, and shards do not depend on the number
of processes that wrote them. A different key is a different folder; ``DIR`` pointing at one cache folder whose key
differs from the run's is a one-line error naming the first field that differs.

What is stored, per pair, flip and image (winner, loser), for the K stored steps:

- ``x`` and ``target`` in float16 (``--inversion_cache_dtype``); the reference is evaluated on the rounded values,
  so a policy reading them back sees exactly what the reference saw (margin 0 at initialisation, as without the
  cache). Later margins move by the rounding (about 1e-6 on the tiny test model, a logit change of 2.5e-3 at
  beta 5000); float32 storage matches an uncached run to float precision at twice the disk;
- ``ref_error`` in float32 (one number per step), or for the reference target ``eps_ref`` in float32: a rounded
  target would give its zero-gradient-at-initialisation objective a gradient of pure rounding noise;
- the conditioning in float32, once where it is shared (SD 1.x: one caption embedding per pair for both images and
  flips; SDXL's time ids differ by image and flip).

Augmentation: flips are kept. With ``--random_flip`` both flips of every pair are stored (twice the disk and build
time; without it, only the unflipped images), and a run picks one by the same (seed, epoch, row) draw as an uncached
run, so the two see the same data. Random crops cannot be enumerated: ``--random_crop`` with a cache
is an error.
"""

import hashlib
import json
import logging
import math
import os
from typing import Dict, List, Optional

import torch

from .data import DataError, collate_pairs
from .objectives import InversionSteps, ObjectiveConfig, invert_pairs


logger = logging.getLogger("inversion_dpo")

CACHE_FORMAT = 3  # 2: one tensor per pair in a shard; 3: with each image's clean latent z0
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
KEY_FILE = "cache.json"


class CacheError(DataError):
    """A cache that cannot serve this run; the message is one line naming what differs."""


# ---------------------------------------------------------------------------------------------------------------
# The key


def stored_step_indices(num_steps: int, num_stored: Optional[int]) -> List[int]:
    """``num_stored`` of the grid's ``num_steps`` steps, evenly spaced (the middle of K equal runs); all by default."""
    if num_stored is None or num_stored >= num_steps:
        return list(range(num_steps))
    return [int((j + 0.5) * num_steps / num_stored) for j in range(num_stored)]


def module_fingerprint(module: torch.nn.Module) -> str:
    """Hash of a module's frozen weights: every tensor's name, shape and dtype, and the bytes of up to 4096 evenly
    strided elements of it (any fine-tune changes those). LoRA weights are left out and peft's ``base_layer`` names
    read as the plain ones, so the same UNet hashes the same with and without an adapter."""
    h = hashlib.sha256()
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    for name in sorted(tensors):
        if "lora_" in name:
            continue
        flat = tensors[name].detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, min(flat.numel(), 4096), device=flat.device).long()
        sample = flat[index].cpu().contiguous()
        h.update(f"{name.replace('.base_layer', '')}|{tuple(flat.shape)}|{flat.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def probe_batch(resolution: int) -> dict:
    """One caption and an image size: what ``encode_conditioning`` needs to show which text encoders it runs."""
    return {
        "captions": ["a probe of the text encoders"],
        "original_sizes": torch.full((1, 2, 2), resolution),
        "crop_top_lefts": torch.zeros(1, 2, 2, dtype=torch.long),
    }


def tensors_fingerprint(tensors) -> str:
    """Hash of tensor values rounded to 4 significant digits (stable across kernels and devices)."""
    h = hashlib.sha256()
    for v in tensors:
        h.update(f"{tuple(v.shape)}".encode())
        h.update(" ".join(f"{x:.3e}" for x in v.detach().float().reshape(-1)[:4096].tolist()).encode())
    return h.hexdigest()[:16]


def _name(path_or_id: Optional[str]) -> Optional[str]:
    return os.path.abspath(path_or_id) if path_or_id and os.path.exists(path_or_id) else path_or_id


def cache_key(args, arch, pairs, cfg: ObjectiveConfig, conditioning_fingerprint: str, weight_dtype) -> dict:
    """Everything the stored values depend on, and nothing the policy side alone uses (beta, links, chunks...)."""
    grid = cfg.inversion_grid
    return {
        "format": CACHE_FORMAT,
        "model": {
            "name": _name(args.pretrained_model_name_or_path),
            "revision": args.revision,
            "variant": args.variant,
            "vae": _name(getattr(args, "pretrained_vae_model_name_or_path", None)),
            "unet_weights": module_fingerprint(arch.unet),
            "vae_weights": module_fingerprint(arch.vae),
            "conditioning": conditioning_fingerprint,
            "weights_dtype": str(weight_dtype),
        },
        "data": {
            "name": _name(args.dataset_name),
            "config": args.dataset_config_name,
            "split": args.dataset_split_name,
            "columns": [args.image_column_0, args.image_column_1, args.label_column, args.caption_column],
            "fingerprint": getattr(pairs.dataset, "_fingerprint", None),
            "pairs": len(pairs),
            "resolution": args.resolution,
            "flips": [False, True] if pairs.hflip else [False],
        },
        "inversion": {
            "steps": len(grid.timesteps),
            "guidance_scale": cfg.inversion_guidance_scale,
            "target": cfg.inversion_target,
            "loss_space": "v" if cfg.v_space else "epsilon",
            "timesteps": grid.timesteps.tolist(),
            "alphas": tensors_fingerprint([grid.alphas]),
            "stored_steps": stored_step_indices(len(grid.timesteps), args.cache_steps),
        },
        "storage": args.inversion_cache_dtype,
    }


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def first_difference(found: dict, expected: dict, prefix: str = "") -> Optional[str]:
    """``"inversion.steps: the cache has 10, this run 20"`` for the first differing field in the key's own order (the
    settings a user chose come before what follows from them), or None."""
    for name in list(expected) + [n for n in found if n not in expected]:
        a, b = found.get(name), expected.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            diff = first_difference(a, b, f"{prefix}{name}.")
            if diff:
                return diff
        elif a != b:
            return f"{prefix}{name}: the cache has {json.dumps(a)}, this run {json.dumps(b)}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# The folder


class InversionCache:
    def __init__(self, folder: str, key: dict, shard_size: int):
        self.folder, self.key, self.shard_size = folder, key, shard_size
        self.hash = key_hash(key)
        self.num_pairs = key["data"]["pairs"]
        self.flips = key["data"]["flips"]
        self.steps = key["inversion"]["stored_steps"]
        self.dtype = STORAGE_DTYPES[key["storage"]]

    @classmethod
    def locate(cls, root: str, key: dict, shard_size: int) -> "InversionCache":
        """``root/<key hash>``, or ``root`` itself when it is one cache's folder (then its key must be this run's)."""
        own = os.path.join(root, KEY_FILE)
        if os.path.exists(own):
            return cls._checked(root, key, own)
        folder = os.path.join(root, key_hash(key))
        path = os.path.join(folder, KEY_FILE)
        if os.path.exists(path):
            return cls._checked(folder, key, path)
        return cls(folder, key, shard_size)

    @classmethod
    def _checked(cls, folder, key, path) -> "InversionCache":
        with open(path) as f:
            found = json.load(f)
        diff = first_difference(found["key"], key)
        if diff:
            raise CacheError(f"inversion cache '{folder}' was built for other settings ({diff}); pass its parent folder "
                             "to build one for this run next to it")  # fmt: skip
        return cls(folder, key, found["shard_size"])

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_pairs / self.shard_size)

    def shard_path(self, shard: int) -> str:
        return os.path.join(self.folder, f"shard-{shard:05d}.safetensors")

    def missing_shards(self) -> List[int]:
        return [s for s in range(self.num_shards) if not os.path.exists(self.shard_path(s))]

    def write_key(self):
        os.makedirs(self.folder, exist_ok=True)
        _atomic_write(os.path.join(self.folder, KEY_FILE), lambda tmp: _dump_json(tmp, self.meta()))

    def meta(self) -> dict:
        return {"key": self.key, "hash": self.hash, "shard_size": self.shard_size}

    def bytes_per_pair(self, latent_shape, cond_numel: int) -> int:
        """At most: the conditioning counted for every flip and image, as if nothing were shared."""
        size = self.dtype.itemsize
        if self.key["inversion"]["target"] == "reference":  # x, and eps_ref in float32
            per_step = math.prod(latent_shape) * (size + 4)
        else:  # x and target, and ref_error one float32
            per_step = math.prod(latent_shape) * 2 * size + 4
        return len(self.flips) * 2 * (len(self.steps) * per_step + math.prod(latent_shape) * size + 4 * cond_numel)


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def _dump_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)


def _atomic_write(path: str, write, suffix: str = ""):
    """Writes through a temporary file renamed into place: a reader never sees half a file."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{suffix}")
    write(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Building


def flatten_cond(cond, prefix="cond.") -> Dict[str, torch.Tensor]:
    """``{"cond.encoder_hidden_states": ..., "cond.added_cond_kwargs.time_ids": ...}`` from the UNet's kwargs."""
    flat = {}
    for name, value in cond.items():
        if isinstance(value, dict):
            flat.update(flatten_cond(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def unflatten_cond(flat: Dict[str, torch.Tensor]) -> dict:
    cond = {}
    for name, value in flat.items():
        *path, leaf = name.split(".")[1:]
        node = cond
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cond


def _pair_major(v: torch.Tensor, B: int) -> torch.Tensor:
    """[K, 2B, ...] (steps, winners then losers) -> [B, 2, K, ...]."""
    return v.reshape(v.shape[0], 2, B, *v.shape[2:]).transpose(0, 2).contiguous()


def _shared(v: torch.Tensor) -> torch.Tensor:
    """[S, F, 2, ...] -> the same with the flip and/or image dim cut to 1 where every copy is equal."""
    for dim in (1, 2):
        if all(torch.equal(v.select(dim, 0), v.select(dim, j)) for j in range(1, v.shape[dim])):
            v = v.narrow(dim, 0, 1)
    return v.contiguous()


def per_pair(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``{"x.3": [F, 2, ...], ...}``: one tensor per pair, so that reading a pair reads that pair alone (safetensors
    materialises a whole tensor to slice it)."""
    return {f"{name}.{j}": v[j].clone() for name, v in tensors.items() for j in range(v.shape[0])}


@torch.no_grad()
def build_shard(cache: InversionCache, shard: int, pairs, encode, reference, cfg, batch_size: int, autocast):
    """Inverts the shard's pairs (every stored flip) and writes them; ``encode(batch) -> (z0, cond, null_cond)``."""
    from safetensors.torch import save_file

    first, last = shard * cache.shard_size, min((shard + 1) * cache.shard_size, cache.num_pairs)
    per_flip = []
    for flip in cache.flips:
        parts = []
        for start in range(first, last, batch_size):
            rows = range(start, min(start + batch_size, last))
            z0, cond, null_cond = encode(collate_pairs([pairs.load(i, flip) for i in rows]))
            B = len(rows)
            steps = torch.tensor(cache.steps, device=z0.device)[:, None].expand(-1, 2 * B)
            with autocast():
                inv = invert_pairs(reference, z0, cond, null_cond, cfg, steps, round_to=cache.dtype)
            part = {
                "x": _pair_major(inv.x, B).to(cache.dtype),
                "z0": z0.reshape(2, B, *z0.shape[1:]).transpose(0, 1).to(cache.dtype),  # for --sft_weight
                **{f: _pair_major(getattr(inv, f), B).float() for f in ("ref_error", "eps_ref") if getattr(inv, f) is not None},
                **{k: v.reshape(2, B, *v.shape[1:]).transpose(0, 1).float() for k, v in flatten_cond(cond).items()},
            }  # fmt: skip
            if inv.target is not None:
                part["target"] = _pair_major(inv.target, B).to(cache.dtype)
            parts.append({k: v.cpu() for k, v in part.items()})
        per_flip.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    tensors = {k: torch.stack([f[k] for f in per_flip], dim=1) for k in per_flip[0]}  # [S, F, 2, ...]
    tensors.update({k: _shared(v) for k, v in tensors.items() if k.startswith("cond.")})
    tensors = per_pair(tensors)
    metadata = {"hash": cache.hash, "first_pair": str(first), "num_pairs": str(last - first)}
    _atomic_write(cache.shard_path(shard), lambda tmp: save_file(tensors, tmp, metadata), suffix=f"-{os.getpid()}")


def build(cache: InversionCache, accelerator, pairs, encode, reference, cfg, batch_size: int, bytes_per_pair: int):
    """Builds this process's missing shards (``s % num_processes == process_index``); every process returns once all
    shards exist."""
    missing = cache.missing_shards()
    if accelerator.is_main_process:
        if not os.path.exists(os.path.join(cache.folder, KEY_FILE)):
            cache.write_key()
        total = bytes_per_pair * cache.num_pairs
        logger.info(
            f"inversion cache {cache.folder}: {cache.num_pairs} pairs x {len(cache.flips)} flips x "
            f"{len(cache.steps)} steps, {_size(total)} at most on disk; "
            + (f"building {len(missing)} of {cache.num_shards} shards" if missing else "complete, reused")
        )
    accelerator.wait_for_everyone()
    mine = [s for s in missing if s % accelerator.num_processes == accelerator.process_index]
    for i, shard in enumerate(mine):
        build_shard(cache, shard, pairs, encode, reference, cfg, batch_size, accelerator.autocast)
        logger.info(f"inversion cache: shard {shard} written ({i + 1}/{len(mine)} of this process)")
    accelerator.wait_for_everyone()
    still_missing = cache.missing_shards()
    if still_missing:
        raise CacheError(f"inversion cache '{cache.folder}': shard {still_missing[0]} is missing after the build")


# ---------------------------------------------------------------------------------------------------------------
# Reading


class CachedPairs(torch.utils.data.Dataset):
    """The cached reference side of each pair, with the flip an uncached run would draw for it this epoch. Items
    hold ``[2, K, ...]`` tensors (winner, loser) and the conditioning; ``collate_cached`` batches them."""

    def __init__(self, cache: InversionCache, pairs):
        self.cache, self.pairs = cache, pairs
        self._open = (None, None)

    @property
    def epoch(self):
        return self.pairs.epoch

    @epoch.setter
    def epoch(self, value):
        self.pairs.epoch = value

    def __len__(self):
        return self.cache.num_pairs

    def _handle(self, shard: int):
        from safetensors import safe_open

        path = self.cache.shard_path(shard)
        if self._open[0] != path:
            handle = safe_open(path, framework="pt")
            if handle.metadata().get("hash") != self.cache.hash:
                raise CacheError(f"inversion cache shard '{path}' belongs to another cache (hash "
                                 f"{handle.metadata().get('hash')}, expected {self.cache.hash})")  # fmt: skip
            self._open = (path, handle)
        return self._open[1]

    def __getitem__(self, index):
        flip = self.pairs.draw_flip(self.pairs.augmentation_rng(index))
        shard, row = divmod(index, self.cache.shard_size)
        handle = self._handle(shard)
        f = self.cache.flips.index(flip)
        item = {"cond": {}}
        suffix = f".{row}"
        for key in handle.keys():
            if not key.endswith(suffix):
                continue
            name, value = key[: -len(suffix)], handle.get_tensor(key)  # [F, 2, ...], or 1 where shared
            value = value[min(f, value.shape[0] - 1)]
            value = value.expand(2, *value.shape[1:])
            if name.startswith("cond."):
                item["cond"][name] = value
            else:
                item[name] = value
        return item


def collate_cached(items) -> dict:
    batch = {k: torch.stack([i[k] for i in items]) for k in items[0] if k != "cond"}  # [B, 2, K, ...]
    batch["cond"] = {k: torch.stack([i["cond"][k] for i in items]) for k in items[0]["cond"]}  # [B, 2, ...]
    return batch


def cached_inversion_steps(batch: dict, stored_steps: List[int]):
    """A collated batch as ``(InversionSteps, cond, z0)``: rows winners then losers, as an uncached batch."""

    def rows(v):  # [B, 2, ...] -> [2B, ...]
        return torch.cat([v[:, 0], v[:, 1]])

    def steps_first(v):  # [B, 2, K, ...] -> [K, 2B, ...]
        return rows(v).transpose(0, 1).float().contiguous()

    x = steps_first(batch["x"])
    steps = torch.tensor(stored_steps, device=x.device)[:, None].expand(-1, x.shape[1])
    fields = {f: steps_first(batch[f]) if f in batch else None for f in ("target", "ref_error", "eps_ref")}
    cond = unflatten_cond({k: rows(v) for k, v in batch["cond"].items()})
    return InversionSteps(steps, x, **fields), cond, rows(batch["z0"]).float()
