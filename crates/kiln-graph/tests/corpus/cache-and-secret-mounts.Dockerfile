FROM busybox
RUN --mount=type=cache,target=/var/cache/apk,sharing=locked \
    --mount=type=secret,id=npmrc,target=/root/.npmrc \
    apk add curl
