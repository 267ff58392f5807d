FROM busybox
HEALTHCHECK --interval=1m30s --timeout=5s --retries=2 CMD wget -q -O- localhost
STOPSIGNAL SIGQUIT
