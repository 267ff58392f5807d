FROM busybox AS Builder
RUN build
FROM busybox
COPY --from=BUILDER /out /out
