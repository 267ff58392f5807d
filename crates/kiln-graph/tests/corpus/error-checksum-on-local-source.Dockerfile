FROM busybox
ADD --checksum=sha256:abc local.txt /x
