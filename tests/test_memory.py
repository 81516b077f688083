"""The peak-memory counter the benchmarks use, on allocations whose sizes are known."""

import torch

from benchmarks.memory import PeakTensorMemory


MB = 2**20


def test_peak_counts_live_storages_and_forgets_freed_ones():
    with PeakTensorMemory() as m:
        a = torch.zeros(MB // 4)  # 1 MB of float32
        b = torch.zeros(MB // 2)  # 2 MB
        view = b[: MB // 4]  # a view costs nothing
        del a
        c = torch.zeros(MB // 4)  # 1 MB: the total is back to 3 MB, not 4
    assert m.peak == 3 * MB
    assert m.live == 3 * MB
    del b, view, c
    assert m.live == 0


def test_meta_tensors_and_autograd_count():
    # a model too large to run: on the meta device nothing is allocated, yet the sizes are counted
    w = torch.zeros(1024, 1024, device="meta", requires_grad=True)
    with PeakTensorMemory() as m:
        x = torch.zeros(64, 1024, device="meta")
        (x @ w).sin().sum().backward()  # sin saves its input (64 x 1024) for the backward
    assert m.peak >= 2 * 64 * 1024 * 4 and w.grad.shape == w.shape
    with PeakTensorMemory() as held:
        y = torch.zeros(64, 1024, device="meta")
        out = [(y @ w).sin() for _ in range(4)]  # four graphs held at once: four times the saved activations
    assert held.peak >= 4 * 2 * 64 * 1024 * 4 and len(out) == 4


def test_weights_from_before_the_block_are_not_counted_when_an_op_reads_them():
    # nn.Linear reads its weight through a transposed view, an in-place op returns its input: neither allocates
    for device in ("cpu", "meta"):
        with torch.device(device):
            linear = torch.nn.Linear(512, 512)  # 1 MB of float32 weight, made before the block
        x = torch.zeros(2, 512, device=device)
        with torch.no_grad(), PeakTensorMemory() as m:
            y = linear(x)  # 4 KB out
            y.mul_(2)
            linear.weight.add_(1)
        assert m.peak == 2 * 512 * 4, device
