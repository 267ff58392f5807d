FROM a AS build
FROM b
COPY --from=build /out/bin /usr/local/bin/
