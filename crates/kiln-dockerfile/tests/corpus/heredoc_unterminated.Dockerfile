FROM a
RUN <<EOF
echo never ends
