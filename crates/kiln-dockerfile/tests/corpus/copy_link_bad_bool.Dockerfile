FROM a
COPY --link=maybe a b
