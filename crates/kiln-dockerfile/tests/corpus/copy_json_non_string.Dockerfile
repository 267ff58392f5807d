FROM a
COPY ["a", 2] /x
