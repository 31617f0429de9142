"""`inference.GRPCInferenceService` (Open Inference Protocol, KServe v2 / Triton): decode, call the engine,
encode. No model or session logic here: sequences live in the engine (`server.engine.sequences`), which model
version serves a request is oip_models' business."""

import asyncio
import importlib.metadata

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc

from server.engine import Engine, StepAnswer
from server.logsafe import clip
from server.metrics import Metrics
from server.models.registry import ModelRegistry, VersionState
from server.transport import oip_convert as convert
from server.transport.auth import current_principal
from server.transport.errors import status_for, streaming, unary
from server.transport.oip_models import SERVING, OipModels, version_name
from server.transport.streams import read_ahead, refused

# Methods whose handlers answer with bytes they serialized themselves (see PreEncodedResponses)
PRE_ENCODED = tuple(f"/{pb.DESCRIPTOR.services_by_name['GRPCInferenceService'].full_name}/{method}"
                    for method in ("ModelInfer", "ModelStreamInfer"))
SERVER_NAME = "lstmserve"
EXTENSIONS = ("model_configuration", "model_repository", "sequence", "statistics")
UNLOAD_PARAMETERS = ("unload_dependents",)  # tritonclient always sends it; lstmserve has no ensembles


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, registry: ModelRegistry, metrics: Metrics, stream_window: int):
        self._registry = registry
        self._models = OipModels(registry)
        self._metrics = metrics
        self._stream_window = stream_window  # requests read ahead of the answers sent, per stream

    @unary
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=not self._registry.draining.is_set())

    @unary
    async def ModelReady(self, request, context):
        ready = self._models.ready(request.name, request.version) and not self._registry.draining.is_set()
        return pb.ModelReadyResponse(ready=ready)

    @unary
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=importlib.metadata.version(SERVER_NAME),
                                         extensions=EXTENSIONS)

    @unary
    async def ModelMetadata(self, request, context):
        described = self._models.engine(request.name, request.version, new_work=False).describe()
        response = convert.model_metadata(described.metadata)
        if not request.version:  # the model's: every version that serves
            response.versions[:] = self._models.served_versions(request.name)
        return response

    @unary
    async def ModelConfig(self, request, context):
        described = self._models.engine(request.name, request.version, new_work=False).describe()
        return pb.ModelConfigResponse(config=convert.model_config(described.metadata, described.limits))

    @unary
    async def ModelStatistics(self, request, context):
        """Per loaded version: of one version, of every version of one model, or of every model."""
        if request.version:
            versions = [self._models.engine(request.name, request.version, new_work=False).describe().metadata]
        else:
            versions = [s.metadata for s in self._models.statuses(request.name) if s.metadata and s.state in SERVING]
            if request.name and not versions:
                raise convert.UnknownModel(f"model {clip(request.name)} has no loaded version")
        return pb.ModelStatisticsResponse(model_stats=[self._statistics(m.name, m.version) for m in versions])

    @unary
    async def RepositoryIndex(self, request, context):
        """Every model version the server knows, with its state and the reason for it; `ready`: READY ones."""
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=s.name, version=version_name(s), state=s.state.value,
                                                  reason=s.reason)
            for s in self._models.statuses() if not request.ready or s.state is VersionState.READY])

    @unary
    async def RepositoryModelLoad(self, request, context):
        if request.parameters:
            raise convert.RequestFormatError(
                f"load parameters ({', '.join(sorted(request.parameters))}) are not supported: change the model's "
                "files and config.json in the repository, then load it")
        await self._models.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @unary
    async def RepositoryModelUnload(self, request, context):
        unknown = set(request.parameters) - set(UNLOAD_PARAMETERS)
        if unknown:
            raise convert.RequestFormatError(f"unload parameters {sorted(unknown)} are not supported")
        await self._models.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @unary
    async def ModelInfer(self, request, context):
        return convert.infer_response(await self._answer(request, *await self._submit(request)))

    @streaming
    async def ModelStreamInfer(self, request_iterator, context):
        submitted = read_ahead(request_iterator, self._submit_in_band, self._stream_window,
                               self._registry.draining, self._registry.draining_refusal,
                               awaited=lambda submitted: submitted[2], cancellable=_stateless)
        async for request, call, pending in submitted:
            try:
                response = await self._answer(request, call, pending)
            except Exception as error:  # noqa: BLE001 - one failed request must not end the stream
                failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                yield pb.ModelStreamInferResponse(error_message=status_for(error)[1], infer_response=failed)
            else:
                yield convert.stream_response(response)

    # -- helpers --------------------------------------------------------------------------------

    def _statistics(self, name: str, version: str) -> pb.ModelStatistics:
        executions, steps, compute_seconds = self._metrics.model_totals(name, version)
        compute = pb.StatisticDuration(count=executions, ns=round(compute_seconds * 1e9))
        return pb.ModelStatistics(name=name, version=version, inference_count=steps, execution_count=executions,
                                  inference_stats=pb.InferStatistics(compute_infer=compute))

    async def _submit(self, request: pb.ModelInferRequest) -> tuple[convert.InferCall, asyncio.Future]:
        """Queues the request's work now, so requests on one stream keep their order; returns its future."""
        name, version, owner = request.model_name, request.model_version, current_principal()
        call = convert.decode_request(request)
        if call.sequence_id is None:
            engine = self._models.engine(name, version)
            pending = asyncio.ensure_future(self._predict(engine, call.inputs["INPUT"], call.inputs.get("H0"),
                                                          call.inputs.get("C0")))
        else:
            engine, pending = await self._models.sequence_step(name, version, call, owner)
        call.version = engine.describe().metadata.version
        return call, pending

    @staticmethod
    async def _predict(engine: Engine, inputs, h0, c0) -> StepAnswer:
        outputs, h_n, c_n = await engine.predict(inputs, h0, c0, owner=current_principal())
        return StepAnswer(outputs, (h_n, c_n))

    async def _submit_in_band(self, request: pb.ModelInferRequest):
        """Like _submit, but a rejected request becomes a failed future instead of raising."""
        try:
            return request, *await self._submit(request)
        except Exception as error:  # noqa: BLE001 - reported in-band on this request's answer
            return request, None, refused(error)

    async def _answer(self, request, call: convert.InferCall, pending: asyncio.Future) -> list:
        answer: StepAnswer = await pending
        available = dict(zip(convert.OUTPUTS, (answer.outputs, *(answer.state or ())), strict=False))
        return convert.encode_response(request, call.version,
                                       {name: available[name] for name in call.outputs})


def _stateless(submitted: tuple) -> bool:
    """Whether a submitted request is a stateless Predict (not a sequence's step), which nothing needs once its
    client has gone: cancelling it frees its model call, and fails none of the Predicts merged with it."""
    _, call, _ = submitted
    return call is not None and call.sequence_id is None
