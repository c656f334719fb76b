# One respreg node per container. Build: docker build -t respreg .
# Run three with the same --peers list and secret file; see docs/operations.md.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY respreg ./respreg
RUN pip install --no-cache-dir . && useradd --system --home-dir /data respreg \
    && mkdir -p /data && chown respreg /data
USER respreg
VOLUME /data
EXPOSE 7000 17000
ENTRYPOINT ["respreg"]
# A single-node cluster by default; pass your own `serve ...` flags for a real cluster.
CMD ["serve", "--id", "1", "--port", "7000", "--peer-port", "17000", "--bind", "0.0.0.0", \
     "--data-dir", "/data", "--peers", "1=127.0.0.1:17000"]
