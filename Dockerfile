# nodepatch worker image. Build:  docker build -t nodepatch .
# Run (PostgreSQL; secrets from the environment, never baked into the image):
#   docker run --rm nodepatch db upgrade            # once, with the same -e options as below
#   docker run -d --name nodepatch-worker -p 9464:9464 \
#     -e NODEPATCH_DATABASE_URL=postgresql://nodepatch@db01/nodepatch -e PGPASSWORD \
#     -e NODEPATCH_VMM_PASSWORD -v /etc/nodepatch:/etc/nodepatch:ro nodepatch
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine engine
COPY workflows workflows
COPY migrations migrations
RUN pip install . && rm -rf /src

RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/nodepatch nodepatch
USER nodepatch
WORKDIR /var/lib/nodepatch

# The configuration file is optional (mount it and point NODEPATCH_CONFIG at it); the
# database URL and every secret come from the environment at run time. Without
# NODEPATCH_DATABASE_URL the worker uses SQLite under /var/lib/nodepatch (mount a volume).
ENV NODEPATCH_LOG_FORMAT=json \
    XDG_STATE_HOME=/var/lib/nodepatch/state
VOLUME ["/var/lib/nodepatch/state"]
EXPOSE 9464

ENTRYPOINT ["nodepatch"]
CMD ["worker", "--concurrency", "4", "--metrics-port", "9464"]
