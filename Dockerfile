# One image for every backdial role: pods run it as backdial-acceptor, backdial-sidecar,
# the app (`backdial serve ...`) and the operator (`backdial operator`).
# Build (BuildKit): docker build -t ghcr.io/backdial/backdial:0.1.0 .
# Behind a TLS-intercepting proxy add --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt
# (a PEM bundle that includes the proxy's CA). docs/image.md has the details.
# No `# syntax=` line: the Dockerfile frontend built into the engine is enough, so nothing
# has to be pulled besides BASE_IMAGE.

ARG BASE_IMAGE=debian:bookworm-slim

# --- runtime: the base plus Debian's Python; shared by the build and the final stage ---
FROM ${BASE_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Unpinned on purpose: a Debian stable suite only moves by security updates, and pinned
# versions stop existing in the archive once one arrives.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca-bundle \
    ca=(); if [ -s /run/secrets/ca-bundle ]; then ca=(-o Acquire::https::CAInfo=/run/secrets/ca-bundle); fi; \
    apt-get "${ca[@]}" update \
 && DEBIAN_FRONTEND=noninteractive apt-get "${ca[@]}" install -y --no-install-recommends python3 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log

# --- requirements: the dependency lists alone, so that editing other parts of pyproject.toml
# (version, tool settings) leaves the cached dependency layer below untouched ---
FROM runtime AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); \
open("build-requirements.txt", "w").write("\n".join(p["build-system"]["requires"])); \
open("requirements.txt", "w").write("\n".join(p["project"]["dependencies"]))'

# --- engine: the sidecar's native relay engine (Rust), built with Debian's own toolchain ---
# (rustc 1.63, which the crate and its Cargo.lock are kept compatible with; that cargo reads
# the crates.io index from GitHub, so vendor.py fetches the locked .crate files from
# static.crates.io instead and the build runs offline). Only the built module leaves.
FROM runtime AS engine
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca-bundle \
    ca=(); if [ -s /run/secrets/ca-bundle ]; then ca=(-o Acquire::https::CAInfo=/run/secrets/ca-bundle); fi; \
    apt-get "${ca[@]}" update \
 && DEBIAN_FRONTEND=noninteractive apt-get "${ca[@]}" install -y --no-install-recommends cargo \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src/engine
COPY sidecar/engine/Cargo.toml sidecar/engine/Cargo.lock sidecar/engine/vendor.py ./
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle; fi; \
    mkdir -p /root/.cargo && python3 vendor.py Cargo.lock /src/vendor > /root/.cargo/config.toml
COPY sidecar/engine/src ./src
RUN cargo build --release --offline \
 && cp target/release/libbackdial_engine.so /src/backdial_engine.abi3.so

# --- build: the project and its dependencies in a virtualenv ---
FROM runtime AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca-bundle \
    ca=(); if [ -s /run/secrets/ca-bundle ]; then ca=(-o Acquire::https::CAInfo=/run/secrets/ca-bundle); fi; \
    apt-get "${ca[@]}" update \
 && DEBIAN_FRONTEND=noninteractive apt-get "${ca[@]}" install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# Two virtualenvs: /opt/buildtools holds pip and the build backend and stays in this stage;
# /opt/backdial (no pip) gets the project and its dependencies and is all the final stage
# takes. Dependencies first: a source-only change then rebuilds offline.
COPY --from=requirements /src/requirements.txt /src/build-requirements.txt ./
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi; \
    python3 -m venv /opt/buildtools \
 && python3 -m venv --without-pip /opt/backdial \
 && /opt/buildtools/bin/pip install --requirement build-requirements.txt \
 && /opt/buildtools/bin/pip --python /opt/backdial/bin/python install --requirement requirements.txt
COPY pyproject.toml README.md ./
COPY src ./src
COPY acceptor ./acceptor
COPY sidecar ./sidecar
COPY operator ./operator
COPY --from=engine /src/backdial_engine.abi3.so /tmp/engine/
RUN /opt/buildtools/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
 && /opt/buildtools/bin/pip --python /opt/backdial/bin/python install --no-deps /tmp/wheels/*.whl \
 && cp /tmp/engine/backdial_engine.abi3.so \
      "$(/opt/backdial/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')/" \
 && /opt/backdial/bin/python -c 'import backdial_engine' \
 && /opt/backdial/bin/backdial --help >/dev/null

# --- final: runtime + the venv, nothing else ---
FROM runtime
# Fixed uid/gid 65532, the injected containers' default runAsUser (Kubernetes runAsNonRoot
# can verify a numeric USER). /run/backdial (= /var/run/backdial) is writable by it for
# `docker run` without a volume; with a read-only root filesystem mount a volume there (the
# injected pods mount the backdial-run emptyDir).
RUN groupadd --gid 65532 backdial \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin backdial \
 && install -d -o 65532 -g 65532 -m 0750 /run/backdial
COPY --from=build /opt/backdial /opt/backdial
ENV PATH=/opt/backdial/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["backdial"]
CMD ["--help"]
# Last, so that a new revision only rewrites metadata (ARGs in scope reach RUN steps).
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG BASE_IMAGE=debian:bookworm-slim
LABEL org.opencontainers.image.title="backdial" \
      org.opencontainers.image.description="Reverse-flow Layer-7 proxy: acceptor, sidecar, SDK and Kubernetes operator in one image" \
      org.opencontainers.image.source="https://github.com/backdial/backdial" \
      org.opencontainers.image.url="https://github.com/backdial/backdial" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="backdial" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
