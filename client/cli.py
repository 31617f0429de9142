"""`lstmserve-client`: models and their versions, model info, whole-sequence predictions from a file, and
step-by-step streaming."""

import argparse
import os
import sys
from collections.abc import Iterator

import grpc
import numpy as np
from lstmserve.v1 import lstm_service_pb2 as pb

from client.channel import Credentials
from client.sync import LstmClient

# Credentials fields -> (flag, environment variable, help). Prefer the variable for the token: flags are
# visible to other users of the machine in the process list.
CREDENTIAL_FLAGS = {
    "root_certificates": ("--tls-roots", "LSTMSERVE_TLS_ROOTS", "PEM file of the CA(s) to trust"),
    "certificate_chain": ("--tls-client-cert", "LSTMSERVE_TLS_CLIENT_CERT", "PEM client certificate (mTLS)"),
    "private_key": ("--tls-client-key", "LSTMSERVE_TLS_CLIENT_KEY", "PEM key of --tls-client-cert"),
    "token": ("--token", "LSTMSERVE_TOKEN", "bearer token (prefer the environment variable)"),
    "server_name": ("--tls-server-name", "LSTMSERVE_TLS_SERVER_NAME",
                    "name to check the server's certificate against, if not the address's host"),
}


def read_rows(stream) -> Iterator[np.ndarray]:
    """One float vector per non-empty line, comma- or whitespace-separated; '#' starts a comment."""
    for line in stream:
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if line:
            yield np.array(line.split(), dtype=np.float32)


def load_sequence(path: str) -> np.ndarray:
    """`[seq_len, batch, input]` from a .npy file (a 2-D array is one sequence) or CSV rows (one sequence)."""
    array = np.load(path) if path.endswith(".npy") else np.stack(list(read_rows(open(path))))
    return array[:, np.newaxis, :] if array.ndim == 2 else array


def format_row(row: np.ndarray) -> str:
    return ",".join(f"{v:.6g}" for v in np.atleast_1d(row))


def print_models(models) -> None:
    """One line per model version: name, version, state (and why), sizes, live sessions; '*' marks the default."""
    print("MODEL VERSION STATE SESSIONS INPUT HIDDEN LAYERS OUTPUT REASON")
    for m in models:
        state = pb.ModelVersionStatus.State.Name(m.state) + ("*" if m.is_default else "")
        sizes = [m.info.input_size, m.info.hidden_size, m.info.num_layers, m.info.output_size] \
            if m.HasField("info") else ["-"] * 4
        print(m.name, m.version, state, m.live_sessions, *sizes, m.reason or "-")


def run(args: argparse.Namespace, client: LstmClient) -> int:
    if args.command == "health":
        status = client.health()
        print(status)
        return 0 if status == "SERVING" else 1
    if args.command == "models":
        print_models(client.models())
    elif args.command == "info":
        print(client.info(), end="")
    elif args.command == "predict":
        h0 = np.load(args.h0) if args.h0 else None
        c0 = np.load(args.c0) if args.c0 else None
        result = client.predict(load_sequence(args.file), h0, c0)
        if args.output:
            np.savez(args.output, outputs=result.outputs, h_n=result.h_n, c_n=result.c_n)
        for t, step in enumerate(result.outputs):
            print(f"t={t}", " | ".join(format_row(row) for row in step))
        print("h_n", format_row(result.h_n.ravel()))
        print("c_n", format_row(result.c_n.ravel()))
    elif args.command == "stream":
        source = sys.stdin if args.file == "-" else open(args.file)
        with client.session() as session:
            for output in session.stream(read_rows(source)):
                print(format_row(output), flush=True)
            if args.show_state:
                h, c = session.state()
                print("h", format_row(h.ravel()))
                print("c", format_row(c.ravel()))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lstmserve-client", description=__doc__)
    parser.add_argument("--address", default=os.environ.get("LSTMSERVE_ADDRESS", "127.0.0.1:50051"),
                        help="server host:port [LSTMSERVE_ADDRESS]")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per call")
    parser.add_argument("--tls", action="store_true", default=os.environ.get("LSTMSERVE_TLS", "") == "1",
                        help="use TLS with the system's root certificates; implied by any option below "
                             "[LSTMSERVE_TLS=1]")
    for field, (flag, env, text) in CREDENTIAL_FLAGS.items():
        parser.add_argument(flag, dest=field, default=os.environ.get(env) or None,
                            metavar=flag.rsplit("-", 1)[1].upper(), help=f"{text} [{env}]")
    parser.add_argument("--model", default=os.environ.get("LSTMSERVE_MODEL", ""), metavar="NAME[:VERSION]",
                        help="model (and version) to use; default: the server's only or default model, at its "
                             "current version [LSTMSERVE_MODEL]")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("health", help="print the server's health; exit 0 only when SERVING")
    commands.add_parser("models", help="list every model and version: state (* marks the default), live "
                                       "sessions, sizes, and why a version is unavailable")
    commands.add_parser("info", help="print the served model's sizes and limits")
    predict = commands.add_parser("predict", help="run whole sequences from a .npy or CSV file")
    predict.add_argument("file", help=".npy [seq_len, batch, input] or [seq_len, input]; or CSV rows")
    predict.add_argument("--h0", help=".npy [num_layers, batch, hidden]")
    predict.add_argument("--c0", help=".npy [num_layers, batch, hidden]")
    predict.add_argument("--output", help="also save outputs, h_n and c_n to this .npz file")
    stream = commands.add_parser("stream", help="stream rows step by step through a new session")
    stream.add_argument("file", nargs="?", default="-", help="CSV rows, one time step each (default: stdin)")
    stream.add_argument("--show-state", action="store_true", help="print the session's final (h, c)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        credentials = Credentials(tls=args.tls, **{field: getattr(args, field) for field in CREDENTIAL_FLAGS})
        client = LstmClient(args.address, timeout=args.timeout, credentials=credentials, model=args.model)
    except (ValueError, OSError) as error:  # a certificate without its key, an unreadable file
        print(f"lstmserve-client: {error}", file=sys.stderr)
        return 2
    with client:
        try:
            return run(args, client)
        except grpc.RpcError as error:
            print(f"lstmserve-client: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        except (ValueError, OSError) as error:  # a missing file, a row that is not numbers, ragged rows
            print(f"lstmserve-client: {error}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
