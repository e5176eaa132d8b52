# Canvalo chat backend: a slim image that runs `uvicorn app:app` as a non-root user.
#
#   docker build -t canvalo-chat .
#   docker run --env-file .env -p 127.0.0.1:8000:8000 --stop-timeout 30 canvalo-chat  # production (.env.example)
#   docker run --rm -p 127.0.0.1:8000:8000 -v canvalo-data:/app/data canvalo-chat # development, embedded default
#
# Stopping: uvicorn gets SIGTERM, stops accepting, lets open streams run for SHUTDOWN_GRACE_SECONDS, then ends the
# rest with a retryable error chunk and saves their partial answers. The orchestrator must wait longer than that
# before SIGKILL: `docker stop` waits 10 s by default (use --stop-timeout / compose stop_grace_period: 30s /
# Kubernetes terminationGracePeriodSeconds: 30).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

RUN groupadd --system --gid 10001 canvalo \
 && useradd --system --uid 10001 --gid canvalo --home-dir /app --no-create-home --shell /usr/sbin/nologin canvalo

COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY app.py settings.py errors.py ./
COPY services/ services/
COPY web/ web/

# The only writable places: the embedded store's directory and the per-worker metrics snapshots.
RUN mkdir -p /app/data /tmp/canvalo-metrics && chown canvalo:canvalo /app/data /tmp/canvalo-metrics

ENV API_HOST=0.0.0.0 \
    API_PORT=8000 \
    SQLITE_PATH=/app/data/canvalo.db \
    METRICS_DIR=/tmp/canvalo-metrics \
    SHUTDOWN_GRACE_SECONDS=20 \
    MAX_CONNECTIONS=10000 \
    KEEP_ALIVE_SECONDS=75 \
    WEB_CONCURRENCY=2 \
    FORWARDED_ALLOW_IPS=127.0.0.1

USER canvalo
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('API_PORT', '8000')}/health\", timeout=4).status == 200 else 1)"]

# `python app.py --check` first checks every setting as `python app.py` does (one line naming the variable, exit status
# 2): a uvicorn worker that stops on a bad setting only makes its parent exit 0, which Docker reports as completed.
# The shell only expands the settings and then exec's uvicorn, so uvicorn is PID 1 and receives SIGTERM itself.
# The metrics snapshots in METRICS_DIR (*.json, *.json.tmp) are deleted first: a previous run's workers must not be
# added to this run's totals. Only those: anything else kept there (a mounted volume's database) stays.
# uvicorn reads WEB_CONCURRENCY (workers) and FORWARDED_ALLOW_IPS (proxies whose X-Forwarded-For it trusts) itself;
# the default 127.0.0.1 is never nginx outside the container: .env sets nginx's address (.env.example says how).
# Its access log is off because it prints query strings (user ids); the service logs each request without them.
# --http web.tcp:NoDelayH11Protocol: with several workers uvicorn's socket leaves Nagle on; the protocol also closes a
# connection that has not sent its request head within HEADER_READ_TIMEOUT and caps MAX_CONNECTIONS_PER_ADDRESS (a
# proxy in FORWARDED_ALLOW_IPS is exempt), which protects the port when it is published directly; see web/tcp.py.
# --limit-concurrency and --timeout-keep-alive: MAX_CONNECTIONS per worker (then 503) and KEEP_ALIVE_SECONDS (longer
# than nginx's upstream keepalive_timeout, so nginx never reuses a connection the service is closing).
CMD ["sh", "-c", "python app.py --check && rm -f \"${METRICS_DIR:?}\"/*.json \"${METRICS_DIR:?}\"/*.json.tmp && keep_alive=${KEEP_ALIVE_SECONDS:-75} && exec uvicorn app:app --host \"$API_HOST\" --port \"$API_PORT\" --proxy-headers --timeout-graceful-shutdown \"${SHUTDOWN_GRACE_SECONDS%.*}\" --limit-concurrency \"${MAX_CONNECTIONS:-10000}\" --timeout-keep-alive \"${keep_alive%.*}\" --no-access-log --http web.tcp:NoDelayH11Protocol"]
