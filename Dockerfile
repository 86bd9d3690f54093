# syntax=docker/dockerfile:1
# Build a static (musl) binary, then ship it alone on a distroless image.
FROM rust:1.95-alpine AS build
RUN apk add --no-cache "musl-dev=~1.2"
WORKDIR /src
COPY Cargo.toml Cargo.lock clippy.toml routes.toml prices.toml ./
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && cp target/release/oa-bypass /oa-bypass \
    && mkdir -p /state/acme /state/spend

# distroless/static: no shell, CA certificates and a non-root user included.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /oa-bypass /usr/local/bin/oa-bypass
# Manifests for other providers (--config /etc/oa-bypass/examples/groq.toml).
COPY examples /etc/oa-bypass/examples
# The official spec, for openapi.schemas (OA_BYPASS_OPENAPI__SCHEMAS=/etc/oa-bypass/spec/openai-openapi.json).
COPY spec/openai-openapi.json /etc/oa-bypass/spec/openai-openapi.json
# server.acme.cache_dir for the compose file's https profile, and limits.state_file's folder
# (named keys' spend). Owned by the nonroot user, so a named volume mounted here starts out
# writable by it (distroless has no shell to chown with).
COPY --from=build --chown=65532:65532 /state /var/lib/oa-bypass
# Named keys' spend must outlive the container (OA_BYPASS_LIMITS__STATE_FILE=/var/lib/oa-bypass/spend/spend.json).
VOLUME ["/var/lib/oa-bypass/spend"]
# distroless's nonroot user
USER 65532:65532
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/oa-bypass", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/oa-bypass"]
