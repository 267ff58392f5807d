FROM busybox
RUN echo zero
FROM busybox AS named
COPY --from=0 /a /a
RUN echo named
