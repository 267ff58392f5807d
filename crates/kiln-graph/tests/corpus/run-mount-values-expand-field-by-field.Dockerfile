FROM busybox
ARG KIND=cache DIR=/var/cache/a,b SHARE=locked
RUN --mount=type=$KIND,target=$DIR,sharing=$SHARE ls
RUN --mount=type=tmpfs,target=/t,size=${SIZE:-1m} ls
