FROM busybox
ENV GREETING hello world
