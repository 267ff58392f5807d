FROM busybox
RUN []
