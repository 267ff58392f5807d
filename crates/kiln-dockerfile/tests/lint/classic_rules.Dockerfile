FROM busybox as Base
MAINTAINER me@example.com
ENV A 1
LABEL b 2
COPY $SRC /app/
CMD ["a"]
CMD ["b"]
FROM busybox AS base
FROM scratch AS scratch
FROM busybox AS context
