FROM busybox AS tools
FROM busybox
ARG STAGE=tools
COPY --from=$STAGE /bin/sh /sh
