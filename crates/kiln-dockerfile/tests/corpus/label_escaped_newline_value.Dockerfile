FROM a
LABEL a="line \
 continued"
