FROM busybox
ARG NET=none
RUN --network=$NET true
