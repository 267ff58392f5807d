FROM a
ENV GREETING="hello world" OTHER='single $V'
