FROM a
COPY --link=false a b
