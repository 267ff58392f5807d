FROM busybox
USER 1000:1000
WORKDIR /home/app
RUN id
