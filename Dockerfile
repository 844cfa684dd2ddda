# The worker for NVIDIA GPUs: one container per GPU (see docker-compose.yml).
# Build: docker build -t horde-worker .
# Run:   docker run --gpus '"device=0"' -v ./bridgeData.yaml:/worker/bridgeData.yaml:ro -v ./models:/worker/models \
#          -p 127.0.0.1:8186:8186 horde-worker
FROM python:3.11-slim-bookworm

# OpenCV and the face tools need libGL and GLib; curl runs the healthcheck.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl=7.88.* libgl1=1.6.* libglib2.0-0=2.74.* \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 worker
WORKDIR /worker
COPY --chown=worker:worker . /worker
USER 1000

# The same install path as a volunteer's: update-runtime.sh picks the CUDA build of torch.
RUN ./update-runtime.sh --cuda && rm -rf /home/worker/.cache/pip

# Every bridgeData.yaml key can also be given as AIWORKER_<KEY>, e.g. AIWORKER_API_KEY, AIWORKER_DREAMER_NAME.
# In a container the dashboard must listen beyond the container's own loopback to be published.
ENV AIWORKER_CACHE_HOME=/worker/models \
    AIWORKER_DASHBOARD_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
VOLUME ["/worker/models", "/worker/logs"]
EXPOSE 8186
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8186/healthz"]
ENTRYPOINT ["/worker/.venv/bin/python", "-m", "horde_worker"]
