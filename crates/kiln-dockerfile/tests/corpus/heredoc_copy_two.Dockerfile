FROM a
COPY <<one.txt <<two.txt /dst/
1
one.txt
2
two.txt
