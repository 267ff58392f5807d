FROM a
ARG T=cache D=/c
RUN --mount=type=$T,target=$D,sharing=locked ls
RUN --mount=type=secret,id=$ID ls
