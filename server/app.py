"""Composition root: the App wires model, engine, servicers, health, reflection, metrics and tracing, and owns
start and stop; the process around it (signals, the entry point) is server/main.py."""

import asyncio
import dataclasses
import logging
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from inference import grpc_service_pb2, grpc_service_pb2_grpc
from lstmserve.v1 import lstm_service_pb2, lstm_service_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from server.engine import Engine, EngineLimits, ModelThread, StateUnavailable
from server.engine.admission import SharedQuotas
from server.metrics import Metrics
from server.model import ModelMetadata, ModelRuntime
from server.models.registry import ModelRegistry, VersionState
from server.models.repository import ModelEntry, scan, single_file
from server.policies import Durability
from server.settings import Settings
from server.store import (
    MemoryStore,
    RedisSessionStore,
    RedisStateStore,
    SessionStore,
    SnapshotStore,
    StoreUnavailable,
    model_identity,
)
from server.tracing import Tracing
from server.transport import oip, servicer
from server.transport.auth import Authenticator, AuthInterceptor
from server.transport.interceptors import MalformedRequestInterceptor, MetricsInterceptor, PreEncodedResponses
from server.transport.oip import OipServicer
from server.transport.servicer import LstmServicer
from server.transport.tls import ServerCertificates

log = logging.getLogger("lstmserve")

SERVICE_NAME = lstm_service_pb2.DESCRIPTOR.services_by_name["LstmService"].full_name
OIP_SERVICE_NAME = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# What may be served without credentials when open_health_and_reflection is on: neither touches sessions.
OPEN_SERVICE_NAMES = (HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)


def engine_limits(settings: Settings) -> EngineLimits:
    """The engine's limits, as the settings give them."""
    return EngineLimits(**{field.name: getattr(settings, field.name) for field in dataclasses.fields(EngineLimits)})


class App:
    """One server process: `await start()`, then `await stop()`; ports are known after start."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None):
        self.settings = settings
        self.metrics = Metrics(registry or CollectorRegistry())
        self.health = HealthServicer()
        self.registry: ModelRegistry | None = None
        self._model_thread: ModelThread | None = None
        self._tracing: Tracing | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._store: RedisStateStore | None = None
        self._certificates: ServerCertificates | None = None
        self._authenticator: Authenticator | None = None
        self.tracer_provider = None  # an SDK TracerProvider of this App's own while tracing is on

    async def start(self, before_listening: Callable[[], None] | None = None) -> None:
        """Loads and warms up the models, then opens the port; health turns SERVING last."""
        s = self.settings
        self._start_metrics_http()
        tracing_interceptors = self._start_tracing()
        self._tracing = Tracing(self.tracer_provider.get_tracer("lstmserve")) if self.tracer_provider else None
        await self._open_state_store()
        self._model_thread = ModelThread(s.torch_threads)
        self._quotas = SharedQuotas(engine_limits(s))  # per-principal limits and max_sessions span models
        self.registry = ModelRegistry(self._scan, self._engine_for, engine_limits(s), s.device, s.default_model,
                                      s.drain_timeout, s.poll_repository, self._locate if self._store else None)
        # versions unloaded after their drain are no longer the server's: UNAVAILABLE counts the failed ones
        self.metrics.watch_versions([state.name for state in VersionState], lambda: [
            (v.name, v.state.name) for v in self.registry.statuses()
            if v.state is not VersionState.UNAVAILABLE or v.failed])
        await self.registry.start()
        self._server = grpc.aio.server(
            # the server span comes first, so it covers the RPC whole: refusals by the later interceptors too;
            # authentication before anything about the request: a stranger's malformed one is UNAUTHENTICATED
            interceptors=[*tracing_interceptors, MetricsInterceptor(self.metrics), *self._auth_interceptors(),
                          MalformedRequestInterceptor(), PreEncodedResponses(servicer.PRE_ENCODED + oip.PRE_ENCODED)],
            options=[("grpc.max_receive_message_length", s.max_message_bytes),
                     ("grpc.max_send_message_length", s.max_message_bytes)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        lstm_service_pb2_grpc.add_LstmServiceServicer_to_server(
            LstmServicer(self.registry, self.metrics, s.stream_window, s.max_batch_entries, s.max_message_bytes),
            self._server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            OipServicer(self.registry, self.metrics, s.stream_window), self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, OIP_SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        try:
            if s.tls:
                self._certificates = ServerCertificates(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)
                self.port = self._server.add_secure_port(f"{s.host}:{s.port}", self._certificates.credentials())
            else:
                self.port = self._server.add_insecure_port(f"{s.host}:{s.port}")
        except RuntimeError:  # grpcio's "Failed to bind" (in use, no such address); older ones returned 0
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {s.host}:{s.port} (in use, or not an address of this host)")
        if before_listening:
            before_listening()
        await self._server.start()
        await self._set_health()
        self.registry.on_change(lambda: asyncio.get_running_loop().create_task(self._set_health()))
        served = ", ".join(f"{v.metadata.name} version {v.metadata.version}" for v in self.registry.statuses()
                           if v.state is VersionState.READY)
        log.info("serving model %s on %s:%d (%s; metrics on port %s)", served, s.host, self.port,
                 self._security_summary(), self.metrics_port)

    @property
    def engine(self) -> Engine:
        """The default model's default version (the only one, with --model-path)."""
        return self.registry.engine()

    async def _set_health(self) -> None:
        """SERVING while every model has a READY version (and the server is not shutting down)."""
        if self.registry.draining.is_set():
            return
        status = health_pb2.HealthCheckResponse.SERVING if self.registry.serving() \
            else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME, OIP_SERVICE_NAME):
            await self.health.set(service, status)

    def _scan(self) -> dict[str, ModelEntry]:
        """The models as they are on disk now: the repository's, or the one --model-path file."""
        s = self.settings
        return scan(s.model_repository) if s.model_repository else single_file(s.model_path)

    def _engine_for(self, runtime: ModelRuntime, limits: EngineLimits) -> Engine:
        return Engine(runtime, limits, self.metrics, store=self._session_store(runtime.metadata),
                      tracing=self._tracing, model_thread=self._model_thread, quotas=self._quotas)

    async def _locate(self, session_id: str, owner: str) -> str | None:
        """The model identity a session's record in the state store names, if it is there and `owner`'s."""
        try:
            record = await self._store.load(session_id)
        except StoreUnavailable as error:
            raise StateUnavailable(str(error), error.retry_after) from error
        return None if record is None or record.owner != owner else record.model

    def _auth_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        s = self.settings
        if not s.auth:
            return []
        if s.tokens_file and not s.tls:
            log.warning("bearer tokens are accepted over plaintext: turn on TLS unless a proxy encrypts the "
                        "connection")
        self._authenticator = Authenticator(s.tokens_file, client_certificates=bool(s.tls_client_ca_file))
        open_services = OPEN_SERVICE_NAMES if s.open_health_and_reflection else ()
        return [AuthInterceptor(self._authenticator, open_services)]

    def _start_tracing(self) -> list[grpc.aio.ServerInterceptor]:
        """With an OTLP endpoint: a tracer provider of the App's own (the process-wide one stays untouched) that
        batches spans to the endpoint, and the gRPC instrumentation's server interceptor, which continues the
        caller's W3C trace context. The SDK is imported here, so a server that does not trace never loads it."""
        if not self.settings.otlp_endpoint:
            return []
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the default name
        resource = Resource.create({SERVICE_NAME: "lstmserve"}).merge(OTELResourceDetector().detect())
        self.tracer_provider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(endpoint=self.settings.otlp_endpoint)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("tracing to %s", self.settings.otlp_endpoint.split("@")[-1])  # never a password in the URL
        return [aio_server_interceptor(tracer_provider=self.tracer_provider)]

    def _security_summary(self) -> str:
        s = self.settings
        transport = "mutual TLS" if s.tls_client_ca_file else "TLS" if s.tls else "plaintext"
        methods = [name for name, on in (("bearer tokens", s.tokens_file), ("client certificates",
                                                                            s.tls_client_ca_file)) if on]
        return f"{transport}, " + (f"auth by {' or '.join(methods)}" if methods else "no auth")

    def reload(self) -> None:
        """Re-reads certificate and token files and the model repository (SIGHUP); open connections and live
        sessions are untouched."""
        if self.registry and self.settings.model_repository:
            asyncio.get_running_loop().create_task(self.registry.reload())
        tokens = self._authenticator if self.settings.tokens_file else None
        for name, part in (("TLS certificates", self._certificates), ("tokens file", tokens)):
            if part is None:
                continue
            try:
                part.reload()
                log.info("reloaded the %s", name)
            except (OSError, ValueError) as error:
                log.error("kept the previous %s: cannot reload: %s", name, error)

    def _session_store(self, metadata: ModelMetadata) -> SessionStore:
        """Where one model version's sessions outlive this process: the state store shared by replicas, a
        snapshot directory (one per version with a repository), or nowhere."""
        s = self.settings
        model = model_identity(metadata)
        if s.snapshot_dir:
            directory = Path(s.snapshot_dir)
            if s.model_repository:
                directory = directory / metadata.name / metadata.version
            return SnapshotStore(directory, model)
        if not self._store:
            return MemoryStore()
        return RedisSessionStore(self._store, s.durability, model, s.checkpoint_every,
                                 s.checkpoint_interval, self.metrics)

    async def _open_state_store(self) -> None:
        """The state store shared by replicas, when sessions are kept in one."""
        s = self.settings
        if s.snapshot_dir or not s.state_store or s.durability is Durability.NONE:
            return
        replica = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._store = RedisStateStore(s.state_store, replica, lease_ttl=s.lease_ttl, state_ttl=s.idle_timeout,
                                      lease_wait=s.lease_wait)
        if not await self._store.ping():
            log.warning("state store %s is unreachable; sessions that need it get UNAVAILABLE until it is back",
                        s.state_store.split("@")[-1])

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
        if self.registry:
            await self.registry.drain(grace)
        if self._server:
            await self._server.stop(grace)
        if self.registry:
            await self.registry.stop()
        if self._model_thread:
            await asyncio.to_thread(self._model_thread.close)
        if self._store:
            await self._store.close()
        if self._metrics_http:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self.tracer_provider:
            await asyncio.to_thread(self.tracer_provider.shutdown)  # exports the spans still batched
        log.info("stopped")
