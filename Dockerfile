# open EIR as a container image: `eir serve` on the Diameter port, for the lab of
# docker-compose.yml (testbed/README.md) or any deployment that mounts its own config.
#
#   docker build -t open-eir .
#   docker run -p 3868:3868 open-eir          # the example configuration and lists of config/
#   docker run -v "$PWD/config:/etc/eir:ro" -p 3868:3868 open-eir   # your own, mounted over them

# Build stage: a wheel of this repository, with the optional C lookup (eir/lists/_lookup.c)
# compiled, since the slim image has no compiler.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY eir ./eir
COPY dictionaries ./dictionaries
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
# Optional extras of open-eir to install, e.g. EXTRAS=postgres (observations.url) or
# EXTRAS=postgres,fast; none by default.
ARG EXTRAS=
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "$(echo /wheels/*.whl)${EXTRAS:+[$EXTRAS]}" && rm -rf /wheels \
    && useradd --system --home-dir /var/lib/eir --create-home eir
# The example configuration and lists, so that the image serves something out of the box
# (without a configuration `eir serve` refuses to start: it would have no list); mount your
# own directory over /etc/eir, or point $EIR_CONFIG elsewhere.
COPY config /etc/eir
ENV EIR_CONFIG=/etc/eir/eir.yaml
# Observations (observations.sqlite) are written to the working directory: mount a volume
# here to keep them.
WORKDIR /var/lib/eir
USER eir
# Diameter; 9464 is the Prometheus metrics port that `eir serve --metrics` will use.
EXPOSE 3868 9464
CMD ["eir", "serve"]
