FROM a
RUN echo one \
# a comment inside
    two
