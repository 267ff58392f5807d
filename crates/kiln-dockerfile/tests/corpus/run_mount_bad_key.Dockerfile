FROM a
RUN --mount=type=cache,target=/a,colour=blue ls
