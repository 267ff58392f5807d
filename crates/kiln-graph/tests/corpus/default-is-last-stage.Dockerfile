FROM busybox AS a
RUN a
FROM busybox AS b
RUN b
