FROM a
RUN --network=bridge make
