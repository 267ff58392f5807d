FROM busybox
WORKDIR /src
RUN --mount=from=,target=/ctx ls /ctx
RUN --mount=type=cache,from=,target=/c ls /c
