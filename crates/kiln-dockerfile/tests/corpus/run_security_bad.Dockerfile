FROM a
RUN --security=maybe ls
