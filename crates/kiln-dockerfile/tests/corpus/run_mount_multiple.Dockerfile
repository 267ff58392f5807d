FROM a
RUN --mount=type=cache,target=/a --mount=type=cache,target=/b,id=b make
