"""A real TorchScript model that raises inside its forward on a sentinel input: model faults without mocks."""

import torch
from torch import nn

from server.model.metadata import METADATA_FILE, ModelMetadata

FAULT_SENTINEL = 12345.0  # an input value that makes the model's forward raise


class FaultyLstm(nn.Module):
    """nn.LSTM whose forward raises when any input equals FAULT_SENTINEL, failing the whole batch it is in."""

    sentinel: float

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.lstm = nn.LSTM(input_size=input_size, hidden_size=hidden_size)
        self.sentinel = FAULT_SENTINEL

    def forward(
        self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if bool((x == self.sentinel).any()):
            raise RuntimeError("injected model fault")
        return self.lstm(x, hx)


def export_faulty_model(directory, input_size: int = 4, hidden_size: int = 3):
    """Writes the faulty model with lstmserve metadata; returns `(path, scripted module)` (the reference)."""
    torch.manual_seed(0)
    scripted = torch.jit.script(FaultyLstm(input_size, hidden_size).eval())
    metadata = ModelMetadata(
        name="faulty",
        version="test",
        input_size=input_size,
        hidden_size=hidden_size,
        num_layers=1,
        output_size=hidden_size,
    )
    path = directory / "faulty.pt"
    torch.jit.save(scripted, str(path), _extra_files={METADATA_FILE: metadata.to_json()})
    return path, torch.jit.load(str(path))
