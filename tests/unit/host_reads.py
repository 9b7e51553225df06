"""A check that a pass can be captured in a CUDA graph: it reads no device value on the host."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class NoHostReads(TorchDispatchMode):
    """Fails on an operator that brings a device value back to the host: a CUDA graph cannot
    capture one (the capture is refused), so the captured step and prefill must have none."""

    READS = {torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default,
             torch.ops.aten.nonzero.default, torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"{func} reads a device value on the host")
        return func(*args, **(kwargs or {}))
