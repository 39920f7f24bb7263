"""Helpers shared by several test modules."""
from torch.overrides import TorchFunctionMode


class HostSyncDetector(TorchFunctionMode):
    """Flags every tensor -> host conversion (each one would synchronise a GPU and break graph capture)
    and every torch.tensor(host data) (a host-to-device copy on a GPU, which graph capture forbids too)."""
    FORBIDDEN = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "nonzero", "cpu",
                 "tensor"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.FORBIDDEN:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))
