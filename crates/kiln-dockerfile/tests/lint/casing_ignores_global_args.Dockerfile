arg V=1.36
FROM busybox:${V}
RUN true
run true
