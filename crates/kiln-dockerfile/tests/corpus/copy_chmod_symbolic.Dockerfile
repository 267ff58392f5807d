FROM a
COPY --chmod=u+x,g-w run.sh /
