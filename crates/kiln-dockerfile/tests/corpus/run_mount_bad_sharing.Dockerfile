FROM a
RUN --mount=type=cache,target=/a,sharing=sometimes ls
