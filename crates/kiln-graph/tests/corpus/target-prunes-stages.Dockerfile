# corpus-target: api
FROM busybox AS base
RUN base
FROM base AS api
RUN api
FROM base AS web
RUN web
FROM busybox AS unrelated
RUN nothing
