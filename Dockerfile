# The image behind compose.yaml's api, bridge and agent services.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fabric_core fabric_core
COPY manager_db manager_db
COPY api api
COPY broker_bridge broker_bridge
COPY agent_stub agent_stub
COPY local_stack local_stack
RUN pip install --no-cache-dir .
RUN useradd --system --home /data policycast && mkdir -p /data /agent && chown policycast /data /agent
USER policycast
