FROM a
RUN
RUN --network=none
