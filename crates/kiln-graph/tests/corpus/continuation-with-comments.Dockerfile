FROM busybox
RUN echo one \
# a comment inside
    two
