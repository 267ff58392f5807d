FROM a
COPY --chmod=999 a /b
