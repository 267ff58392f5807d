FROM a
RUN --security=insecure mount -t tmpfs none /mnt
