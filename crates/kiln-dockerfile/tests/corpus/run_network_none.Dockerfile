FROM a
RUN --network=none make test
