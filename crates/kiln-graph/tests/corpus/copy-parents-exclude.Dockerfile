FROM busybox
COPY --parents --exclude=*.tmp --exclude=cache/ src/**/*.go /build/
