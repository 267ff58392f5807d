FROM a
\
