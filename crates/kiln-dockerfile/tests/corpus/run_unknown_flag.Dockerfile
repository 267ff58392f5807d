FROM a
RUN --mont=type=cache,target=/x ls
