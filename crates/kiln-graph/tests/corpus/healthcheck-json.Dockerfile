FROM busybox
HEALTHCHECK --start-period=10s --start-interval=2s CMD ["wget", "-q", "localhost"]
