FROM busybox
WORKDIR /w
RUN --mount=type=cache,id=c,target=.. ls
