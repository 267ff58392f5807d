FROM busybox:${MISSING}
