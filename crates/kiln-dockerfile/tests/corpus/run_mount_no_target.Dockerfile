FROM a
RUN --mount=type=cache,id=x ls
