FROM busybox AS base
FROM base AS left
RUN left
FROM base AS right
RUN right
FROM busybox AS join
COPY --from=left / /l
COPY --from=right / /r
