# corpus-args: BUILDKIT_DEBUG=1
ARG BUILDKIT_DEBUG
FROM scratch AS image-linux
COPY <<EOF /which
plain
EOF
FROM scratch AS image-linux-debug
COPY <<EOF /which
debug
EOF
FROM image-$TARGETOS${BUILDKIT_DEBUG:+-debug} AS image
