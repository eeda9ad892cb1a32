# The genmon image: `genmon worker`, `genmon infra topics` and the other commands.
# Kafka and PostgreSQL run in their own containers (see docker-compose.yml).

# genmon itself is a pure-Python wheel; its native ingest module (streams/native-rs/, Rust,
# the genmon-native distribution) is built into a wheel here, so the image carries no
# compiler.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends curl gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY genmon/ genmon/
COPY schemas/ schemas/
COPY detectors/ detectors/
COPY streams/ streams/
COPY incidents/ incidents/
COPY replay/ replay/
COPY retrain/ retrain/
COPY infra/ infra/
COPY scheduler/ scheduler/
COPY privacy/ privacy/
COPY api/ api/
RUN pip wheel --no-deps --wheel-dir /wheels . ./streams/native-rs

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
# The worker with embeddings and the native ingest path (genmon-native from /wheels).
RUN pip install --find-links /wheels "genmon[worker,embeddings,native,api]==0.1.0" && rm -rf /wheels

# Relative paths in the settings (home, model cache, sqlite) resolve under the volume.
ENV GENMON_HOME=/var/lib/genmon
WORKDIR /var/lib/genmon
RUN useradd --system --home-dir /var/lib/genmon genmon && chown genmon /var/lib/genmon
USER genmon

# Healthy while the worker answers on its web port (settings.worker.web_port).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["genmon", "health"]

CMD ["genmon", "--help"]
