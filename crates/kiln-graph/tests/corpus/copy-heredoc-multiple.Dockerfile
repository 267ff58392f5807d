FROM busybox
COPY <<one <<two /etc/
first
one
second
two
