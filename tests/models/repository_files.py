"""A model repository on disk for the tests: versions exported by the project's exporter, with their references."""

import json
from pathlib import Path

import grpc
import torch
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from server.model.export import build_module, export

SIZES = (4, 8, 1, None)  # input, hidden, layers, output head


def add_version(repository: Path, name: str, version: int, seed: int, sizes: tuple = SIZES):
    """Writes `repository/name/version/model.pt` (weights from `seed`); returns the scripted reference."""
    module = build_module(*sizes, seed=seed).eval()
    path = repository / name / str(version) / "model.pt"
    export(module, path, name=name, version=str(version))
    return torch.jit.load(str(path))


def corrupt(path: Path) -> None:
    """Writes a version file that is not TorchScript: the version fails to load."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a TorchScript file")


def write_config(repository: Path, name: str, **config) -> None:
    (repository / name).mkdir(parents=True, exist_ok=True)
    (repository / name / "config.json").write_text(json.dumps(config))


def states(channel: grpc.Channel) -> dict[tuple[str, int], pb.ModelVersionStatus]:
    """ListModels as {(name, version): status}."""
    answer = pb_grpc.LstmServiceStub(channel).ListModels(pb.ListModelsRequest())
    return {(m.name, m.version): m for m in answer.models}


def state_name(status: pb.ModelVersionStatus) -> str:
    return pb.ModelVersionStatus.State.Name(status.state)
