"""In-process references: the same TorchScript file run directly, with state carried forward."""

import numpy as np
import torch


class Reference:
    """Runs a scripted model in-process the way a session should: one sequence, state carried forward."""

    def __init__(self, module, num_layers: int, hidden_size: int, h0=None, c0=None):
        self.module = module
        shape = (num_layers, 1, hidden_size)
        self.h = torch.zeros(shape) if h0 is None else torch.as_tensor(h0).reshape(shape)
        self.c = torch.zeros(shape) if c0 is None else torch.as_tensor(c0).reshape(shape)

    def step(self, x: np.ndarray) -> np.ndarray:
        """`x[T, input]` -> `y[T, output]`, advancing the carried state."""
        with torch.no_grad():
            y, (self.h, self.c) = run_module(self.module, torch.as_tensor(x)[:, None, :], (self.h, self.c))
        return y[:, 0].numpy()

    @property
    def state(self) -> tuple[np.ndarray, np.ndarray]:
        return self.h[:, 0].numpy(), self.c[:, 0].numpy()


def run_module(module, x, state):
    """Calls a scripted model (a plain scripted nn.LSTM only has the forward__0 overload)."""
    forward = module.forward if "forward" in module._c._method_names() else module.forward__0
    with torch.no_grad():
        return forward(x, state)


TOLERANCE = 1e-5  # float32; server and reference run the same TorchScript file
