# The project's own image: sidecar (`smdp serve`), solver (`smdp solver-serve`), `smdp ctl`, Locust.
# Triton itself runs in NVIDIA's image (docker-compose.yml, deploy/k8s/), so the `triton` extra
# (nvidia-pytriton's embedded server, ~1 GB) is left out on purpose.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib

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

# 8011 sidecar inference API (KServe v2 gRPC), 8012 sidecar control API (smdp.v1.Control),
# 8013 sidecar Prometheus metrics, 50051 solver (smdp.v1.Solver), 8089 Locust web UI,
# 5557 Locust master <- workers.
EXPOSE 8011 8012 8013 50051 8089 5557

# gRPC health of the sidecar's inference port (the default role); compose overrides it per service.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/app/deploy/healthcheck.py", "grpc", "127.0.0.1:8011"]

ENTRYPOINT ["smdp"]
CMD ["--help"]
