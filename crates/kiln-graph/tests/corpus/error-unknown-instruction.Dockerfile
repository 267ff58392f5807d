FROM busybox
FETCH http://example.com
