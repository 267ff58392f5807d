FROM busybox
ADD --checksum=sha256:0000000000000000000000000000000000000000000000000000000000000000 https://example.com/file.txt /dl/
ADD vendor.tar.gz /opt/
