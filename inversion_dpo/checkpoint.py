"""Training state on disk without pickles: tensors in safetensors files, everything else in JSON.

accelerate's ``save_state`` pickles the optimizer, the scheduler and the random states (``optimizer.bin``,
``random_states_0.pkl``), and loading a pickle runs whatever code it names. A checkpoint here is instead:

    pytorch_lora_weights.safetensors   the adapter (diffusers LoRA format, written by the trainer)
    optimizer.safetensors              the optimizer's tensors; its structure in the file's metadata
    random_states_<process>.safetensors  torch's CPU and CUDA generator states; Python's and numpy's in metadata
    training_state.json                step, the learning-rate scheduler, the gradient scaler

A state dict is stored as a tree (dicts with int or str keys, lists, tuples, numbers, strings, None) whose tensor
leaves live in the safetensors file under their path, so that it comes back with the same keys and types.
"""

import json
import os
import random
from typing import Dict

import numpy as np
import torch
from safetensors.torch import load_file, save_file


OPTIMIZER_FILE = "optimizer.safetensors"
TRAINING_STATE_FILE = "training_state.json"
LORA_FILE = "pytorch_lora_weights.safetensors"


def random_states_file(process_index: int) -> str:
    return f"random_states_{process_index}.safetensors"


def encode_tree(obj, tensors: Dict[str, torch.Tensor], path: str = "s"):
    """A JSON-able description of ``obj``; its tensors go into ``tensors`` under their path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"tensor": path}
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, (int, str)) or isinstance(key, bool):
                raise TypeError(f"cannot store the key {key!r} at {path} without pickle")
        return {"dict": [[key, encode_tree(value, tensors, f"{path}.{key}")] for key, value in obj.items()]}
    if isinstance(obj, (list, tuple)):
        kind = "list" if isinstance(obj, list) else "tuple"
        return {kind: [encode_tree(value, tensors, f"{path}.{i}") for i, value in enumerate(obj)]}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot store a {type(obj).__name__} at {path} without pickle")


def decode_tree(node, tensors: Dict[str, torch.Tensor]):
    ((kind, value),) = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {key: decode_tree(v, tensors) for key, v in value}
    if kind == "list":
        return [decode_tree(v, tensors) for v in value]
    if kind == "tuple":
        return tuple(decode_tree(v, tensors) for v in value)
    return value


def save_tree(path: str, obj):
    tensors = {}
    tree = encode_tree(obj, tensors)
    save_file(tensors, path, metadata={"tree": json.dumps(tree)})


def load_tree(path: str):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        tree = json.loads(f.metadata()["tree"])
    return decode_tree(tree, load_file(path))


def json_tree(obj):
    """``encode_tree`` for state with no tensors (a scheduler's, a gradient scaler's)."""
    tensors = {}
    tree = encode_tree(obj, tensors)
    if tensors:
        raise TypeError(f"state has tensors ({next(iter(tensors))}); store it with save_tree")
    return tree


def random_states() -> dict:
    """Every generator a step draws from: Python's, numpy's legacy global, torch's CPU and CUDA ones."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def set_random_states(states: dict):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def fsync_folder(folder: str):
    """Flushes every file of ``folder`` to disk, so that a machine that loses power after the rename that publishes
    the folder does not publish empty files."""
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
