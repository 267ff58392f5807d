FROM a
HEALTHCHECK --period=1s CMD true
