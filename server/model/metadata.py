"""What the server needs to know about a model, embedded in the TorchScript file or inferred from it."""

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import torch

METADATA_FILE = "lstmserve.json"
SUPPORTED_DTYPES = ("float32",)


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    """Sizes and identity of a served recurrent model."""

    name: str
    version: str
    input_size: int
    hidden_size: int
    num_layers: int
    output_size: int
    dtype: str = "float32"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelMetadata":
        fields = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"unknown metadata fields {sorted(unknown)}")
        return cls(**fields)

    @property
    def state_bytes(self) -> int:
        """Bytes of (h, c) for one sequence."""
        return 2 * self.num_layers * self.hidden_size * 4


def infer_from_lstm_parameters(module: torch.jit.ScriptModule, path: Path) -> ModelMetadata:
    """Reads sizes off the parameters of a scripted `nn.LSTM` saved without lstmserve metadata."""
    params = dict(module.named_parameters())
    layer_weights = sorted(
        (int(m.group(1)), p) for name, p in params.items() if (m := re.fullmatch(r"weight_ih_l(\d+)", name)))
    if not layer_weights:
        raise ValueError("it has neither lstmserve metadata nor nn.LSTM parameters (weight_ih_l0)")
    if any(name.endswith("_reverse") for name in params):
        raise ValueError("bidirectional LSTMs cannot carry state forward step by step")
    if any(name.startswith("weight_hr_") for name in params):
        raise ValueError("LSTMs with proj_size are not supported")
    if getattr(module, "batch_first", False):
        raise ValueError("batch_first LSTMs are not supported; export with batch_first=False")
    hidden_size = params["weight_hh_l0"].shape[1]
    if params["weight_ih_l0"].shape[0] != 4 * hidden_size:
        raise ValueError("its parameters are not shaped like an LSTM (weight_ih_l0 is not [4*hidden, input])")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return ModelMetadata(
        name=path.stem,
        version=f"sha256-{digest}",
        input_size=int(params["weight_ih_l0"].shape[1]),
        hidden_size=int(hidden_size),
        num_layers=len(layer_weights),
        output_size=int(hidden_size),
        dtype=str(params["weight_ih_l0"].dtype).removeprefix("torch."),
    )
