FROM a
RUN --mount=type=cache,target=/a,readonly ls
