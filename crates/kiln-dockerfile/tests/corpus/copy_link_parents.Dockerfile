FROM a
COPY --link --parents ./x/**/*.go /src/
