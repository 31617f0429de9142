"""Model runtime: loads a TorchScript LSTM, checks its contract and runs it. Knows nothing about sessions."""

from server.model.metadata import ModelMetadata
from server.model.runtime import ModelContractError, ModelRuntime

__all__ = ["ModelContractError", "ModelMetadata", "ModelRuntime"]
