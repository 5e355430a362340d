# One image with every geoforge binary: geo-operator, geo-sidecar and kubectl-geo.
#
# No ENTRYPOINT is fixed: the chart's Deployment runs `geo-operator`, the operator's
# StatefulSets run `geo-sidecar`, and `kubectl-geo` can be copied out
# (`docker create` + `docker cp … /usr/local/bin/kubectl-geo .`). The default command prints
# the operator's help.
#
#   docker build -t geoforge:dev .

# ---- build -------------------------------------------------------------------------------
# The full (not slim) Rust image: rusqlite's bundled SQLite and ring compile C with its gcc.
# Same Debian release as the runtime stage, so the binaries find the glibc they were built on.
FROM rust:1.95-trixie AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      --bin geo-operator --bin geo-sidecar --bin kubectl-geo \
 && mkdir -p /out \
 && cp target/release/geo-operator target/release/geo-sidecar target/release/kubectl-geo /out/

# ---- runtime -----------------------------------------------------------------------------
# Debian slim with git (the sidecar runs git fetch, upload-pack and http-backend) and CA
# certificates (https to peer sites), --no-install-recommends: no curl, no editors, no ssh,
# no package lists or caches. Debian's essential set (sh, coreutils) stays: git runs `sh`
# for some operations, and removing essential packages is not supported by Debian.
FROM debian:trixie-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
 && groupadd --gid 65532 geoforge \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin geoforge \
 && mkdir -p /var/lib/geoforge \
 && chown 65532:65532 /var/lib/geoforge
COPY --from=build /out/ /usr/local/bin/
# Numeric, so Kubernetes can verify runAsNonRoot without resolving the name.
USER 65532:65532
ENV HOME=/tmp
WORKDIR /var/lib/geoforge
EXPOSE 8080 8081 8082
CMD ["geo-operator", "--help"]
