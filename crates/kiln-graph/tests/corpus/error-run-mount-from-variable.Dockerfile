FROM busybox AS tools
FROM busybox
ARG STAGE=tools
RUN --mount=from=${STAGE},target=/t ls /t
