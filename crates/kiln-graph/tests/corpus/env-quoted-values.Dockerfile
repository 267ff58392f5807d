FROM busybox
ENV MSG="hello world" SINGLE='$NOT_EXPANDED' ESC=a\ b
