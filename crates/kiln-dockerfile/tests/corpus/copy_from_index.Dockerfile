FROM a
FROM b
COPY --from=0 /x /y
