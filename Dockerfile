# The project's own image: sidecar (`smdp serve`), solver (`smdp solver-serve`), `smdp ctl`, Locust,
# and the native data plane's gate (`smdp-gate`, for `data_plane: native`).
# Triton itself runs in NVIDIA's image (docker-compose.yml, deploy/k8s/), so the `triton` extra
# (nvidia-pytriton's embedded server, ~1 GB) is left out on purpose.
#
# Both stages are pinned to Debian bookworm: the gate is built against bookworm's gRPC C++ 1.51 and
# protobuf 3.21, and the final stage installs exactly those runtime libraries by their bookworm names.

# ---- build stage: smdp-gate (native/), with the packages native/install_deps.sh names ----
FROM python:3.11-slim-bookworm AS gate-build
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ make pkg-config protobuf-compiler libprotobuf-dev libgrpc++-dev \
    && rm -rf /var/lib/apt/lists/*
# native/gen_descriptors.py takes Triton's protocol from the tritonclient wheel (the project's own
# dependency, same bound as pyproject.toml), so the gate's message types are the clients' own; gRPC's
# health and reflection messages (which the gate answers itself) from their wheels.
RUN pip install --no-cache-dir 'tritonclient[grpc]>=2.40' 'grpcio-health-checking>=1.60' 'grpcio-reflection>=1.60'
WORKDIR /src
COPY native ./native
# the shared decision vectors the C++ unit tests run (as tests/test_vectors.py does in Python)
COPY tests/vectors ./tests/vectors
# `test` runs the gate's C++ unit tests: a failing check fails the image build.
RUN make -C native -j"$(nproc)" PYTHON=python all test \
    && strip native/build/smdp-gate

# ---- the image ----
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib

# smdp-gate's runtime libraries (gRPC C++ and protobuf; they pull in abseil, re2, c-ares), and the
# gate itself on PATH, where the sidecar looks for it (plugin/native_plane.py, find_binary).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgrpc++1.51 libprotobuf32 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=gate-build /src/native/build/smdp-gate /usr/local/bin/smdp-gate
# Fail the build, naming the library, if a shared library of the gate is missing.
RUN ! ldd /usr/local/bin/smdp-gate | grep 'not found'

WORKDIR /app

# Dependencies and code first, data after: editing a profile does not reinstall the wheels.
# The install is editable because several defaults are resolved from the source tree
# (profiles/ and model_repository/ beside the packages), which a site-packages copy would lose.
COPY pyproject.toml README.md ./
COPY smdp ./smdp
COPY solver ./solver
COPY plugin ./plugin
COPY loadtest ./loadtest
RUN pip install --editable '.[loadtest]'

COPY profiles ./profiles
COPY model_repository ./model_repository
COPY deploy/healthcheck.py ./deploy/healthcheck.py
# A default sidecar configuration; compose and Kubernetes mount their own over it.
COPY deploy/sidecar.yaml /etc/smdp/sidecar.yaml

RUN useradd --uid 10001 --user-group --no-create-home --home-dir /app smdp \
    && mkdir /out && chown 10001:10001 /out
# /out: where load tests write (Locust's --csv); a named volume mounted there starts with this owner
USER 10001:10001

# 8011 sidecar inference API (KServe v2 gRPC; served by smdp-gate with data_plane: native),
# 8012 sidecar control API (smdp.v1.Control), 8013 sidecar Prometheus metrics, 50051 solver
# (smdp.v1.Solver), 8089 Locust web UI, 5557 Locust master <- workers.
EXPOSE 8010 8011 8012 8013 50051 8089 5557

# gRPC health of the sidecar's inference port (the default role; both data planes serve it);
# compose overrides it per service.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/app/deploy/healthcheck.py", "grpc", "127.0.0.1:8011"]

ENTRYPOINT ["smdp"]
CMD ["--help"]
