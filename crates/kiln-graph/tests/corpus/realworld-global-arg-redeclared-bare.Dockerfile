# A global ARG declared again without a value keeps the value it had (BuildKit v0.24).
ARG V=1.36
ARG V
FROM busybox:${V}
RUN echo ${V}
