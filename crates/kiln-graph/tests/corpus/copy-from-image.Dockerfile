FROM busybox
COPY --from=alpine:3.19 /etc/os-release /os-release
