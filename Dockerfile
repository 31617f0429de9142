# lstmserve server image: slim, non-root, a demo model repository exported at build time, configured by LSTMSERVE_*
# variables.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Where pip finds torch==2.13.0; the default is PyTorch's CPU-only index (no CUDA libraries in the image).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
RUN python -m venv /opt/lstmserve
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY server ./server
COPY client ./client
# deploy/container/wheels/ is empty in the repository; where no index serves torch (deploy/container/build.sh),
# a local CPU wheel put there is mounted for the build only, so it never lands in a layer.
RUN --mount=type=bind,source=deploy/container/wheels,target=/wheels \
    /opt/lstmserve/bin/pip install --no-cache-dir "grpcio-tools==1.85.1" \
 && find proto -name '*.proto' -exec /opt/lstmserve/bin/python -m grpc_tools.protoc -Iproto \
        --python_out=proto --grpc_python_out=proto {} + \
 && /opt/lstmserve/bin/pip install --no-cache-dir --find-links /wheels --extra-index-url "${TORCH_INDEX_URL}" \
        "torch==2.13.0" \
 && /opt/lstmserve/bin/pip install --no-cache-dir . \
 && /opt/lstmserve/bin/pip uninstall --yes grpcio-tools \
 && /opt/lstmserve/bin/lstmserve-export --demo --repository /opt/models --version 1

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --no-create-home lstmserve
COPY --from=build /opt/lstmserve /opt/lstmserve
COPY --from=build /opt/models /opt/models
ENV PATH=/opt/lstmserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    LSTMSERVE_HOST=0.0.0.0 \
    LSTMSERVE_PORT=50051 \
    LSTMSERVE_METRICS_HOST=0.0.0.0 \
    LSTMSERVE_METRICS_PORT=9090 \
    LSTMSERVE_MODEL_REPOSITORY=/opt/models
USER 10001
EXPOSE 50051 9090
# Through a shell so the check follows LSTMSERVE_PORT when a deployment changes it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s \
    CMD ["sh", "-c", "exec lstmserve-client --address \"127.0.0.1:${LSTMSERVE_PORT}\" --timeout 3 health"]
ENTRYPOINT ["lstmserve"]
