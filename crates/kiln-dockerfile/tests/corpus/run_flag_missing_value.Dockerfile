FROM a
RUN --network ls
