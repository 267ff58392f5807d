FROM a
ARG NET=none
RUN --network=$NET true
