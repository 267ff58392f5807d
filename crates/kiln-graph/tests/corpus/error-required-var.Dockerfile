FROM busybox
ENV X=${MISSING:?required}
