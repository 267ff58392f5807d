# corpus-args: NAME=cli
FROM busybox
ENV BEFORE=[$NAME]
ARG NAME=default
ENV AFTER=[$NAME]
