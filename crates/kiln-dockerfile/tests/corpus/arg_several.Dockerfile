FROM a
ARG A=1 B C="three four"
