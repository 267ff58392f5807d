FROM a
RUN ["echo", 1]
