FROM busybox
ARG SEC=insecure
RUN --security=$SEC true
