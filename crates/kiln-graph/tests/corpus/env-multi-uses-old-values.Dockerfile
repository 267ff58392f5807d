FROM busybox
ENV A=1
ENV A=2 B=$A C=${A}
