# The workaround for COPY --from=$VAR: a stage named after a global ARG.
ARG STAGE=tools
FROM busybox AS tools
RUN mkdir /t
FROM ${STAGE} AS chosen
FROM busybox
COPY --from=chosen /t /t
RUN --mount=from=chosen,target=/m ls /m
