FROM busybox
RUN --mount=type=bind ls
