FROM busybox
RUN
RUN --network=none
SHELL ["/bin/ash", "-e", "-c"]
RUN
