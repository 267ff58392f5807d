FROM busybox
RUN --network=none --security=sandbox echo offline
RUN --network=host echo host
