FROM a AS tools
FROM a
ARG STAGE=tools
RUN --mount=from=${STAGE},target=/t ls /t
