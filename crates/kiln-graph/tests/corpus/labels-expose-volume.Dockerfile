FROM busybox
ARG REV=abc
LABEL org.opencontainers.image.revision=$REV "multi word"="yes"
EXPOSE 80 443/tcp 53/udp
VOLUME ["/data", "/logs"]
