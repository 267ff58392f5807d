FROM a
ADD https://example.com/file.tar.gz /tmp/
