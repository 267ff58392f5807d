FROM a
ENV P=/usr/local/bin
ENV Q=${P//\//:}
