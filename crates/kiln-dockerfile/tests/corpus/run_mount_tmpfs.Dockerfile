FROM a
RUN --mount=type=tmpfs,target=/tmp,size=64m make
