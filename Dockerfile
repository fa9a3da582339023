# One image for every backdial role: the pod runs it as backdial-acceptor and
# backdial-sidecar (and `backdial operator` for the controller).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY acceptor ./acceptor
COPY sidecar ./sidecar
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin backdial \
 && mkdir -p /var/run/backdial && chown backdial /var/run/backdial
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
ENTRYPOINT ["backdial"]
CMD ["--help"]
