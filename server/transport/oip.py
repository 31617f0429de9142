"""`inference.GRPCInferenceService` (Open Inference Protocol, KServe v2 / Triton): decode, call the engine,
encode. No model or session logic here: sequences live in the engine (`server.engine.sequences`)."""

import asyncio
import importlib.metadata

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc

from server.engine import Engine, Sequences, StepAnswer
from server.logsafe import clip
from server.metrics import Metrics
from server.model import ModelMetadata
from server.models.registry import ModelRegistry
from server.transport import oip_convert as convert
from server.transport.auth import current_principal
from server.transport.errors import status_for, streaming, unary
from server.transport.streams import read_ahead, refused

SERVER_NAME = "lstmserve"
EXTENSIONS = ("model_configuration", "sequence", "statistics")


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, registry: ModelRegistry, metrics: Metrics, stream_window: int):
        self._registry = registry
        self._metrics = metrics
        self._stream_window = stream_window  # requests read ahead of the answers sent, per stream

    # The default model's current version serves every call (the repository's other models and versions
    # come to this protocol with its repository extension).
    @property
    def _engine(self) -> Engine:
        return self._registry.engine()

    @property
    def _sequences(self) -> Sequences:
        return self._registry.sequences(self._engine)

    @property
    def _model(self) -> ModelMetadata:
        return self._engine.describe().metadata

    @unary
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=not self._registry.draining.is_set())

    @unary
    async def ModelReady(self, request, context):
        ready = self._serves(request.name, request.version) and not self._registry.draining.is_set()
        return pb.ModelReadyResponse(ready=ready)

    @unary
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=importlib.metadata.version(SERVER_NAME),
                                         extensions=EXTENSIONS)

    @unary
    async def ModelMetadata(self, request, context):
        self._check_model(request.name, request.version)
        return convert.model_metadata(self._model)

    @unary
    async def ModelConfig(self, request, context):
        self._check_model(request.name, request.version)
        return pb.ModelConfigResponse(config=convert.model_config(self._model, self._engine.describe().limits))

    @unary
    async def ModelStatistics(self, request, context):
        if request.name:
            self._check_model(request.name, request.version)
        executions, steps, compute_seconds = self._metrics.model_totals(self._model.name, self._model.version)
        compute = pb.StatisticDuration(count=executions, ns=round(compute_seconds * 1e9))
        return pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(
            name=self._model.name, version=self._model.version, inference_count=steps,
            execution_count=executions, inference_stats=pb.InferStatistics(compute_infer=compute))])

    @unary
    async def RepositoryIndex(self, request, context):
        index = pb.RepositoryIndexResponse.ModelIndex(name=self._model.name, version=self._model.version,
                                                      state="READY")
        return pb.RepositoryIndexResponse(models=[index])

    @unary
    async def ModelInfer(self, request, context):
        return await self._answer(request, *await self._submit(request))

    @streaming
    async def ModelStreamInfer(self, request_iterator, context):
        submitted = read_ahead(request_iterator, self._submit_in_band, self._stream_window,
                               self._registry.draining, self._registry.draining_refusal)
        async for request, call, pending in submitted:
            try:
                response = await self._answer(request, call, pending)
            except Exception as error:  # noqa: BLE001 - one failed request must not end the stream
                failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                yield pb.ModelStreamInferResponse(error_message=status_for(error)[1], infer_response=failed)
            else:
                yield pb.ModelStreamInferResponse(infer_response=response)

    # -- helpers --------------------------------------------------------------------------------

    def _serves(self, name: str, version: str) -> bool:
        return name == self._model.name and version in ("", self._model.version)

    def _check_model(self, name: str, version: str) -> None:
        if not self._serves(name, version):
            raise convert.UnknownModel(
                f"model {clip(name)} version {clip(version)} is not served here; this server serves "
                f"{self._model.name!r} version {self._model.version!r} (leave the version empty for it)")

    async def _submit(self, request: pb.ModelInferRequest) -> tuple[convert.InferCall, asyncio.Future]:
        """Queues the request's work now, so requests on one stream keep their order; returns its future."""
        self._check_model(request.model_name, request.model_version)
        call = convert.decode_request(request)
        h0, c0 = call.inputs.get("H0"), call.inputs.get("C0")
        if call.sequence_id is None:
            pending = asyncio.ensure_future(self._predict(call.inputs["INPUT"], h0, c0))
        else:
            pending = await self._sequences.step(
                call.sequence_id, call.inputs["INPUT"], call.start, call.end, h0, c0,
                with_state=any(name in convert.STATE_OUTPUTS for name in call.outputs), owner=current_principal())
        return call, pending

    async def _predict(self, inputs, h0, c0) -> StepAnswer:
        outputs, h_n, c_n = await self._engine.predict(inputs, h0, c0, owner=current_principal())
        return StepAnswer(outputs, (h_n, c_n))

    async def _submit_in_band(self, request: pb.ModelInferRequest):
        """Like _submit, but a rejected request becomes a failed future instead of raising."""
        try:
            return request, *await self._submit(request)
        except Exception as error:  # noqa: BLE001 - reported in-band on this request's answer
            return request, None, refused(error)

    async def _answer(self, request, call: convert.InferCall, pending: asyncio.Future
                      ) -> pb.ModelInferResponse:
        answer: StepAnswer = await pending
        available = dict(zip(convert.OUTPUTS, (answer.outputs, *(answer.state or ())), strict=False))
        return convert.encode_response(request, self._model.version,
                                       {name: available[name] for name in call.outputs})
