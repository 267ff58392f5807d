FROM busybox
COPY https://example.com/x /x
