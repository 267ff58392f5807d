FROM a
RUN --mount=type=volume,target=/a ls
