FROM a
RUN --network=none -- --not-a-flag
