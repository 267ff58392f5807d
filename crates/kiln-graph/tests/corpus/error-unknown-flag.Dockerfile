FROM busybox
COPY --frum=a /x /x
