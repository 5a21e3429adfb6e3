# rulesvc against an external MongoDB (MONGODB_URI is required; no embedded mongod in the image), with
# every plugin of plugins/ (the folders `make install` installs too) and any EXTRA_PLUGINS:
#   docker build --build-arg EXTRA_PLUGINS="rulesvc-whatsapp==1.2" .
FROM python:3.12-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rulesvc ./rulesvc
COPY plugins ./plugins
ARG EXTRA_PLUGINS=""
# durable-rules ships only as an sdist: build every wheel here, so the final image needs no compiler.
# The plugins are each folder of plugins/ with a pyproject.toml, as in the Makefile's PLUGINS.
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
    $(for f in plugins/*/pyproject.toml; do echo "./${f%/pyproject.toml}/"; done) $EXTRA_PLUGINS

FROM python:3.12-slim
RUN useradd --create-home --uid 10001 rulesvc
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY rulesets ./rulesets
USER rulesvc
ENV RULESVC_HOST=0.0.0.0 \
    RULESVC_LOG_FORMAT=json \
    RULESVC_EMBEDDED_MONGOD=false \
    RULESVC_RULESETS_DIR=/app/rulesets
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz').status != 200)"
CMD ["rulesvc", "serve"]
