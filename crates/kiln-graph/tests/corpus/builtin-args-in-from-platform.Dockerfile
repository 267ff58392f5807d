FROM --platform=$TARGETPLATFORM busybox
RUN uname -m
