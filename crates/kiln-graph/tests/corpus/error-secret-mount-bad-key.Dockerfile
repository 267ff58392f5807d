FROM busybox
RUN --mount=type=secret,id=a,size=1 true
