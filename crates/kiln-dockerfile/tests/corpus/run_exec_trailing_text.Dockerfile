FROM a
RUN ["echo"] more
