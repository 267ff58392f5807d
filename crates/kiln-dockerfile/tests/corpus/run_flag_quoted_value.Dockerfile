FROM a
RUN --mount="type=cache,target=/a b" ls
