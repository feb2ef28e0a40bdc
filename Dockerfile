# syntax=docker/dockerfile:1

# --- Stage 1: the web client -------------------------------------------------------------
# With a web-client/package.json the client is built with npm (npm ci needs the lockfile);
# without one the static placeholder in web-client/public is shipped as the "build".
FROM node:20-slim AS web-client
WORKDIR /web-client
COPY web-client/ ./
RUN if [ -f package.json ]; then \
        npm ci && npm run build; \
    else \
        mkdir -p dist && cp -R public/. dist/; \
    fi

# --- Stage 2: the hub ----------------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Pinned dependencies first, so this layer is reused while only the hub's code changes.
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock

COPY pyproject.toml README.md ./
COPY server/ server/
COPY web-client/ web-client/
COPY --from=web-client /web-client/dist/ web-client/dist/
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build portalhub.egg-info

RUN groupadd --system --gid 10001 portalhub \
    && useradd --system --uid 10001 --gid portalhub --no-create-home \
        --home-dir /var/lib/portalhub --shell /usr/sbin/nologin portalhub \
    && mkdir -p /var/lib/portalhub \
    && chown portalhub:portalhub /var/lib/portalhub

# The installed package lives in site-packages, so point it at the client explicitly.
ENV PORTALHUB_HOST=0.0.0.0 \
    PORTALHUB_DATA_DIR=/var/lib/portalhub \
    PORTALHUB_WEB_CLIENT_DIR=/app/web-client/dist

USER portalhub

# 8080 HTTP/Socket.IO, 5222/5223 XMPP (STARTTLS / direct TLS), 2525 mail bridge
EXPOSE 8080 5222 5223 2525

# slim has no curl: probe readiness with the standard library (non-2xx raises, exit 1).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]

CMD ["portalhub", "serve"]
