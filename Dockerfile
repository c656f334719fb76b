# One respreg node per container. Build: docker build -t respreg .
# Run three with the same --peers list and secret file; see docs/operations.md.

# The build stage has a C compiler, so the wheel carries the modules compiled with mypyc.
FROM python:3.11 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY respreg ./respreg
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --home-dir /data respreg && mkdir -p /data && chown respreg /data
USER respreg
VOLUME /data
EXPOSE 7000 17000
ENTRYPOINT ["respreg"]
# A single-node cluster by default; pass your own `serve ...` flags for a real cluster.
CMD ["serve", "--id", "1", "--port", "7000", "--peer-port", "17000", "--bind", "0.0.0.0", \
     "--data-dir", "/data", "--peers", "1=127.0.0.1:17000"]
