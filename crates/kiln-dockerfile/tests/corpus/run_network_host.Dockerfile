FROM a
RUN --network=host curl example.com
