FROM a
RUN echo one \

    two
