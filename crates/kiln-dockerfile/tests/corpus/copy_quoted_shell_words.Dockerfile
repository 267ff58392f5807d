FROM a
COPY "a b" /x
