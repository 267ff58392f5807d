FROM busybox AS base
ENV BASE=1
WORKDIR /srv
USER nobody
FROM base
RUN env
