"""`lstmserve-export`: writes TorchScript LSTM files with lstmserve metadata embedded."""

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from server.model.metadata import METADATA_FILE, ModelMetadata

DEMO_SEED = 2  # the tutorial's torch.manual_seed(2)


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


def demo_module() -> nn.Module:
    """The tutorial's model: nn.LSTM(input_size=4, hidden_size=3) right after torch.manual_seed(2)."""
    return build_module(input_size=4, hidden_size=3, seed=DEMO_SEED)


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lstmserve-export", description=__doc__)
    parser.add_argument("--output", "-o", required=True, help="where to write the TorchScript file")
    parser.add_argument("--demo", action="store_true", help="the tutorial's model (input 4, hidden 3, seed 2)")
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--output-size", type=int, help="add a linear head with this many outputs per step")
    parser.add_argument("--seed", type=int, help="seed for random initial weights")
    parser.add_argument("--checkpoint", help="a state_dict file of a model of these shapes to load weights from")
    parser.add_argument("--name", help="model name (default: the output file's stem, or 'tutorial-lstm')")
    parser.add_argument("--version", default="1", help="model version string (default: 1)")
    args = parser.parse_args(argv)
    if not args.demo and (args.input_size is None or args.hidden_size is None):
        parser.error("give --demo, or --input-size and --hidden-size")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.demo:
        module, name = demo_module(), args.name or "tutorial-lstm"
    else:
        module = build_module(args.input_size, args.hidden_size, args.num_layers, args.output_size, args.seed)
        name = args.name or Path(args.output).stem
    if args.checkpoint:
        state_dict = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        try:
            module.load_state_dict(state_dict)
        except RuntimeError as exc:
            print(f"lstmserve-export: checkpoint does not match the given shapes: {exc}", file=sys.stderr)
            return 2
    metadata = export(module, args.output, name, args.version)
    print(f"wrote {args.output}: {metadata.to_json()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
