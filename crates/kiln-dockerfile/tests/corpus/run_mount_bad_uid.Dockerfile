FROM a
RUN --mount=type=cache,target=/a,uid=root ls
