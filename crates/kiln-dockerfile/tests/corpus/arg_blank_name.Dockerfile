FROM a
ARG =x
