FROM busybox
ARG L=true
COPY --link=$L a /a
