FROM busybox AS binaries
RUN mkdir -p /out

FROM busybox
WORKDIR /w
RUN --mount=from=binaries ls
RUN --mount=type=bind ls
RUN --mount=type=cache,id=x ls
RUN --mount=ro ls
RUN --mount=type=tmpfs ls
RUN --mount=type=bind,target=sub ls sub
RUN --mount=type=bind,target=../up ls /up
RUN --mount=type=secret,id=tok --mount=type=ssh ls /run/secrets
