# The genmon image: `genmon worker`, `genmon infra topics` and the other commands.
# Kafka and PostgreSQL run in their own containers (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/genmon
COPY pyproject.toml README.md ./
COPY genmon/ genmon/
COPY schemas/ schemas/
COPY detectors/ detectors/
COPY streams/ streams/
COPY retrain/ retrain/
COPY infra/ infra/
RUN pip install .

# Relative paths in the settings (home, model cache, sqlite) resolve under the volume.
ENV GENMON_HOME=/var/lib/genmon
WORKDIR /var/lib/genmon
RUN useradd --system --home-dir /var/lib/genmon genmon && chown genmon /var/lib/genmon
USER genmon

CMD ["genmon", "--help"]
