FROM busybox
RUN echo zero
FROM busybox
COPY --from=0 /etc/hostname /h
