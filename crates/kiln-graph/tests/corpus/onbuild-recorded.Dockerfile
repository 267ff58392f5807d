FROM busybox
ONBUILD COPY . /src
ONBUILD RUN make
