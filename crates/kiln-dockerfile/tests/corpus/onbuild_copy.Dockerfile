FROM a
ONBUILD COPY --from=x . /app
