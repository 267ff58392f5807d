FROM a
RUN ["echo", "hello world"]
