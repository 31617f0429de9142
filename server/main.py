"""Composition root: wires model, engine, servicers, health, reflection and metrics; owns start and stop."""

import asyncio
import logging
import signal
import sys
import warnings

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from lstmserve.v1 import lstm_service_pb2, lstm_service_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from server.engine import Engine, LimitExceeded, snapshot
from server.metrics import Metrics
from server.model import ModelContractError, ModelRuntime
from server.settings import Settings
from server.transport.interceptors import MalformedRequestInterceptor, MetricsInterceptor
from server.transport.servicer import LstmServicer

log = logging.getLogger("lstmserve")

SERVICE_NAME = lstm_service_pb2.DESCRIPTOR.services_by_name["LstmService"].full_name


class App:
    """One server process: `await start()`, then `await stop()`; ports are known after start."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None):
        self.settings = settings
        self.metrics = Metrics(registry or CollectorRegistry())
        self.health = HealthServicer()
        self.engine: Engine | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None

    async def start(self) -> None:
        s = self.settings
        torch.set_num_threads(s.torch_threads)
        self._server = grpc.aio.server(
            interceptors=[MetricsInterceptor(self.metrics), MalformedRequestInterceptor()],
            options=[("grpc.max_receive_message_length", s.max_message_bytes),
                     ("grpc.max_send_message_length", s.max_message_bytes)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._server.add_insecure_port(f"{s.host}:{s.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {s.host}:{s.port}")
        await self._server.start()
        self._start_metrics_http()
        runtime = await asyncio.to_thread(self._load_model)
        self.engine = Engine(runtime, s.engine_limits(), self.metrics)
        if s.snapshot_dir:
            snapshot.restore(s.snapshot_dir, self.engine)
        await self.engine.start()
        lstm_service_pb2_grpc.add_LstmServiceServicer_to_server(
            LstmServicer(self.engine, s.stream_window), self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving model %s version %s on %s:%d (metrics on port %s)", runtime.metadata.name,
                 runtime.metadata.version, s.host, self.port, self.metrics_port)

    def _load_model(self) -> ModelRuntime:
        runtime = ModelRuntime.load(self.settings.model_path, self.settings.device)
        runtime.warm_up(self.settings.max_batch_size)
        return runtime

    def _start_metrics_http(self) -> None:
        if self.settings.metrics_port < 0:
            return
        self._metrics_http, _ = start_http_server(
            self.settings.metrics_port, self.settings.metrics_host, registry=self.metrics.registry)
        self.metrics_port = self._metrics_http.server_address[1]

    async def stop(self) -> None:
        """Health goes NOT_SERVING first, then no new RPCs, in-flight work finishes, sessions are released."""
        grace = self.settings.shutdown_grace
        await self.health.enter_graceful_shutdown()
        if self.engine:
            await self.engine.drain(grace)
        if self._server:
            await self._server.stop(grace)
        if self.engine:
            await self.engine.stop()
            if self.settings.snapshot_dir:
                snapshot.save(self.settings.snapshot_dir, self.engine)
        if self._metrics_http:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped")


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    app = App(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await app.start()
        await stopping.wait()
        log.info("signal received; draining")
    finally:
        await app.stop()


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_args(argv)
    warnings.filterwarnings("ignore", message="`torch.jit.", category=DeprecationWarning)  # TorchScript by design
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # no Intel GPU here
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(settings))
    except ModelContractError as error:
        log.error("cannot serve the model: %s", error)
        return 2
    except (OSError, LimitExceeded) as error:
        log.error("cannot start: %s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
