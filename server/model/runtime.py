"""Loads a TorchScript LSTM, checks it honours `(x[T,B,I], (h, c)) -> (y[T,B,O], (h, c))`, and runs it."""

import logging
from pathlib import Path

import torch

from server.model.metadata import METADATA_FILE, SUPPORTED_DTYPES, ModelMetadata, infer_from_lstm_parameters

log = logging.getLogger(__name__)

# oneDNN adds a fixed cost per layer call that makes single steps slower at every batch size up to
# 256 (1.2-2x at batch 64-128, up to 10x for the large model at batch 1), while it speeds up
# sequences 1.7-5x (measured with bench/; see docs/benchmarks.md). So: by length alone.
ONEDNN_MIN_STEPS = 2


class ModelContractError(Exception):
    """The file is not a recurrent model that lstmserve can serve."""


class ModelRuntime:
    """A loaded, checked and warmed-up model; `run` is called from one model thread at a time."""

    def __init__(self, module: torch.jit.ScriptModule, metadata: ModelMetadata, device: str = "cpu"):
        self.module = module
        self._forward = _tensor_forward(module)
        self.metadata = metadata
        self.device = torch.device(device)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "ModelRuntime":
        """Loads and checks a model file; raises ModelContractError with a reason a person can act on."""
        path = Path(path)
        if not path.is_file():
            raise ModelContractError(f"model file {path} does not exist")
        extra = {METADATA_FILE: ""}
        try:
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except Exception as exc:  # torch raises several unrelated types for a foreign file
            raise ModelContractError(f"{path} is not a TorchScript file: {exc}") from exc
        try:
            metadata = (ModelMetadata.from_json(extra[METADATA_FILE]) if extra[METADATA_FILE]
                        else infer_from_lstm_parameters(module, path))
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelContractError(f"{path} is not a recurrent model lstmserve can serve: {exc}") from exc
        if metadata.dtype not in SUPPORTED_DTYPES:
            raise ModelContractError(f"{path}: dtype {metadata.dtype} is not supported; export as float32")
        module.eval()
        runtime = cls(module, metadata, device)
        runtime._check_contract(path)
        return runtime

    def _check_contract(self, path: Path) -> None:
        """Runs a probe batch and checks every output shape against the metadata."""
        m = self.metadata
        steps, batch = 3, 2
        x = torch.randn(steps, batch, m.input_size)
        h, c = self.initial_state(batch)
        try:
            y, h_n, c_n = self.run(x, h, c)
        except Exception as exc:
            raise ModelContractError(
                f"{path} does not accept (x[T,B,{m.input_size}], (h, c)) as an LSTM would: {exc}") from exc
        expected = {"output": (y, (steps, batch, m.output_size)),
                    "h_n": (h_n, (m.num_layers, batch, m.hidden_size)),
                    "c_n": (c_n, (m.num_layers, batch, m.hidden_size))}
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ModelContractError(
                    f"{path}: {name} has shape {list(tensor.shape)}, expected {list(shape)} from its metadata")

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (h, c) for `batch` sequences."""
        shape = (self.metadata.num_layers, batch, self.metadata.hidden_size)
        return torch.zeros(shape, device=self.device), torch.zeros(shape, device=self.device)

    def run(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One model call over `x[T, B, input]` from state `(h, c)`; returns `(y, h_n, c_n)`."""
        use_onednn = x.shape[0] >= ONEDNN_MIN_STEPS
        with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=use_onednn):
            y, (h_n, c_n) = self._forward(x.to(self.device), (h.to(self.device), c.to(self.device)))
        return y, h_n, c_n

    def warm_up(self, max_batch_size: int) -> None:
        """Runs each code path once so the first real request does not pay for TorchScript's profiling."""
        for steps, batch in ((1, 1), (1, max_batch_size), (8, 1), (8, max_batch_size)):
            for _ in range(3):
                self.run(torch.zeros(steps, batch, self.metadata.input_size), *self.initial_state(batch))
        log.info("model %s version %s warmed up", self.metadata.name, self.metadata.version)


def _tensor_forward(module: torch.jit.ScriptModule):
    """The module's forward for tensor input.

    A scripted `nn.LSTM` has no `forward`, only overloads: `forward__0` (Tensor) and `forward__1`
    (PackedSequence).
    """
    names = module._c._method_names()
    if "forward" in names:
        return module.forward
    for name in sorted(n for n in names if n.startswith("forward__")):
        schema = module._c._get_method(name).schema
        if schema.arguments[1].type.kind() == "TensorType":
            return getattr(module, name)
    raise ModelContractError("the module has no forward method taking a Tensor")
