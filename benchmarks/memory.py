"""Peak tensor memory of a block of code on any device, the CPU and the meta device included.

On a GPU ``torch.cuda.max_memory_allocated`` answers this; a CPU has no such counter (torch's CPU allocations are
invisible to ``tracemalloc``, and the process's resident size is dominated by libraries), and a model too large to
run can only be traced on the meta device, where nothing is allocated at all. So this counts what the allocator would
be asked for: the bytes of every tensor storage an aten op creates inside the block, from its creation until it is
freed, and reports the largest total. Storages that existed before the block (the weights) are not counted, and a
view costs nothing beyond its base. Not modelled: the CUDA caching allocator's rounding and fragmentation, workspace
memory of kernels (cuDNN, cuBLAS) and the CUDA context.
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class PeakTensorMemory(TorchDispatchMode):
    """``with PeakTensorMemory() as m: ...`` then ``m.peak`` (bytes); ``m.live`` is what the block left allocated."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _freed(self, num_bytes):
        self.live -= num_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        results = out if len(returns) > 1 else (out,)
        # a return that aliases an input (a view: nn.Linear's transpose of its weight; an in-place op's result)
        # allocates nothing: counting its storage would count a weight from before the block for as long as it lives
        fresh = [r for spec, r in zip(returns, results) if spec.alias_info is None]
        for t in tree_flatten(fresh)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._seen:
                    num_bytes = storage.nbytes()
                    self._seen[storage] = num_bytes
                    weakref.finalize(storage, self._freed, num_bytes)
                    self.live += num_bytes
                    self.peak = max(self.peak, self.live)
        return out
