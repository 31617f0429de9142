"""`lstmserve-export`: writes TorchScript LSTM files with lstmserve metadata embedded, alone or into a model
repository (REPOSITORY/<name>/<version>/model.pt, Triton's layout)."""

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from server.model.metadata import METADATA_FILE, ModelMetadata
from server.models.repository import MODEL_FILE

DEMO_SEED = 2  # the tutorial's torch.manual_seed(2)
# A model name becomes a directory: no separators, no hidden or parent directories.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
VERSION = re.compile(r"[1-9][0-9]*")  # repository versions are positive integers, as in Triton


class LstmWithHead(nn.Module):
    """An LSTM followed by a linear layer applied to every step's output."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, output_size: int):
        super().__init__()
        self.lstm = nn.LSTM(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        self.head = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, state = self.lstm(x, hx)
        return self.head(out), state


def build_module(input_size: int, hidden_size: int, num_layers: int = 1, output_size: int | None = None,
                 seed: int | None = None) -> nn.Module:
    """The eager module the exporter scripts: a bare nn.LSTM, or one with a linear head."""
    if seed is not None:
        torch.manual_seed(seed)
    if output_size is None:
        return nn.LSTM(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
    return LstmWithHead(input_size, hidden_size, num_layers, output_size)


def demo_module(seed: int = DEMO_SEED) -> nn.Module:
    """The tutorial's model: nn.LSTM(input_size=4, hidden_size=3) right after torch.manual_seed(2)."""
    return build_module(input_size=4, hidden_size=3, seed=seed)


def demo_seed(version: str) -> int:
    """Version 1 (or a version that is not a number) is the tutorial's seed; version N draws its weights with
    seed 1 + N, so that every demo version computes other outputs and a roll-out is visible."""
    return DEMO_SEED + int(version) - 1 if VERSION.fullmatch(version) else DEMO_SEED


def export(module: nn.Module, path: str | Path, name: str, version: str) -> ModelMetadata:
    """Scripts `module` and saves it with its metadata; returns the metadata written."""
    lstm = module.lstm if isinstance(module, LstmWithHead) else module
    output_size = module.head.out_features if isinstance(module, LstmWithHead) else lstm.hidden_size
    metadata = ModelMetadata(name=name, version=version, input_size=lstm.input_size,
                             hidden_size=lstm.hidden_size, num_layers=lstm.num_layers, output_size=output_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(module.eval())
    torch.jit.save(scripted, str(path), _extra_files={METADATA_FILE: metadata.to_json()})
    return metadata


def export_to_repository(module: nn.Module, repository: str | Path, name: str, version: str
                         ) -> tuple[Path, ModelMetadata]:
    """Exports into REPOSITORY/<name>/<version>/model.pt; returns that path and the metadata. The version appears
    whole (written beside it, then renamed), so a server scanning the repository never sees half a file; an
    existing version is never overwritten, since servers may be serving it: export a new version instead."""
    final = Path(repository) / name / version
    if final.exists():
        raise FileExistsError(f"{final} already exists; versions are immutable, export version {version} + 1")
    final.parent.mkdir(parents=True, exist_ok=True)
    # A name that is not a positive integer, so repository scans skip it; mkdir (unlike mkdtemp) keeps the
    # umask's permissions, so a server running as another user can read the version.
    staging = final.parent / f".{version}.partial-{os.getpid()}"
    staging.mkdir()
    try:
        metadata = export(module, staging / MODEL_FILE, name, version)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final / MODEL_FILE, metadata


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lstmserve-export", description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", "-o", help="where to write the TorchScript file")
    where.add_argument("--repository", help="a model repository: writes REPOSITORY/<name>/<version>/model.pt")
    parser.add_argument("--demo", action="store_true",
                        help="the tutorial's model (input 4, hidden 3, seed 2; version N > 1: seed 1 + N)")
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--output-size", type=int, help="add a linear head with this many outputs per step")
    parser.add_argument("--seed", type=int, help="seed for random initial weights (also overrides --demo's)")
    parser.add_argument("--checkpoint", help="a state_dict file of a model of these shapes to load weights from")
    parser.add_argument("--name", help="model name (default: the output file's stem, or 'tutorial-lstm')")
    parser.add_argument("--version", default="1",
                        help="model version (default: 1); with --repository a positive integer, the directory")
    args = parser.parse_args(argv)
    if not args.demo and (args.input_size is None or args.hidden_size is None):
        parser.error("give --demo, or --input-size and --hidden-size")
    if args.repository is not None:
        check_repository_args(parser, args)
    return args


def check_repository_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The name and version become directories of the repository, so both must be safe and well-formed."""
    if not VERSION.fullmatch(args.version):
        parser.error(f"--version {args.version!r}: a repository version is a positive integer (1, 2, ...)")
    if not args.demo and args.name is None:
        parser.error("--repository needs --name (the model's directory), or --demo")
    if args.name is not None and not MODEL_NAME.fullmatch(args.name):
        parser.error(f"--name {args.name!r}: letters, digits, '_', '.' and '-', starting with a letter or digit")


def module_and_name(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The module the arguments describe (weights not loaded yet) and the model's name."""
    if args.demo:
        seed = demo_seed(args.version) if args.seed is None else args.seed
        return demo_module(seed), args.name or "tutorial-lstm"
    module = build_module(args.input_size, args.hidden_size, args.num_layers, args.output_size, args.seed)
    return module, args.name or Path(args.output).stem


def write(args: argparse.Namespace, module: nn.Module, name: str) -> tuple[str | Path, ModelMetadata]:
    """Writes the file, or the version's directory of the repository; returns the path and the metadata."""
    if args.repository is None:
        return args.output, export(module, args.output, name, args.version)
    return export_to_repository(module, args.repository, name, args.version)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    module, name = module_and_name(args)
    if args.checkpoint:
        state_dict = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        try:
            module.load_state_dict(state_dict)
        except RuntimeError as exc:
            print(f"lstmserve-export: checkpoint does not match the given shapes: {exc}", file=sys.stderr)
            return 2
    try:
        path, metadata = write(args, module, name)
    except FileExistsError as exc:
        print(f"lstmserve-export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {metadata.to_json()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
