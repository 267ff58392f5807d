FROM a
COPY --chown=ü a b
