"""The process around the App: the entry point (`lstmserve`, `python -m server.main`), logging, the event loop,
signals (SIGTERM/SIGINT drain and stop, SIGHUP reloads) and settling the heap before the port opens."""

import asyncio
import gc
import logging
import signal
import sys
import warnings

from server.app import App
from server.engine import LimitExceeded
from server.model import ModelContractError
from server.settings import Settings

log = logging.getLogger("lstmserve")


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    app = App(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, app.reload)
    try:
        # settled before the port opens: a full collection beside the first TLS handshakes failed some of them
        # ("Handshake read failed") on a loaded machine
        await app.start(before_listening=lambda: settle_heap(settings))
        await stopping.wait()
        log.info("signal received; draining")
    finally:
        await app.stop()


def settle_heap(settings: Settings) -> None:
    """Once the model is loaded and warm: the objects made so far live as long as the process,
    so collecting them again and again only pauses the event loop (gc.callbacks under the bench's 256 streams:
    full collections of 30-120 ms of CPU every few seconds, each one delaying every stream's answer)."""
    gc.set_threshold(settings.gc_threshold, *gc.get_threshold()[1:])
    if settings.gc_freeze:
        gc.collect()  # what is garbage now must not be frozen with the rest
        gc.freeze()


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_args(argv)
    warnings.filterwarnings("ignore", message="`torch.jit.", category=DeprecationWarning)  # TorchScript by design
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # no Intel GPU here
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with asyncio.Runner(loop_factory=settings.event_loop.factory()) as runner:
            runner.run(serve(settings))
    except ModelContractError as error:
        log.error("cannot serve the model: %s", error)
        return 2
    except (OSError, ValueError, LimitExceeded) as error:  # ports, certificate, token and snapshot files
        log.error("cannot start: %s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
