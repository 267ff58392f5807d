FROM a
RUN []
