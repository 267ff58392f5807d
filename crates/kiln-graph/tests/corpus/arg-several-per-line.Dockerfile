FROM busybox
ARG A=1 B=$A C
ENV ABC=$A-$B-[$C]
