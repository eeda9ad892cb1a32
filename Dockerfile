# The genmon image: `genmon worker`, `genmon infra topics` and the other commands.
# Kafka and PostgreSQL run in their own containers (see docker-compose.yml).

# genmon's native ingest module (streams/native-rs/, Rust) is built into a wheel here, so the
# image itself carries no compiler.
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
COPY retrain/ retrain/
COPY infra/ infra/
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels

# Relative paths in the settings (home, model cache, sqlite) resolve under the volume.
ENV GENMON_HOME=/var/lib/genmon
WORKDIR /var/lib/genmon
RUN useradd --system --home-dir /var/lib/genmon genmon && chown genmon /var/lib/genmon
USER genmon

CMD ["genmon", "--help"]
