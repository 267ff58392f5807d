FROM a
ENV =value
