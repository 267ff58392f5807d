ARG UBUNTU_VERSION=22.04
ARG TORCH-VERSION=2.2.1
FROM ubuntu:${UBUNTU_VERSION}
RUN bash install.sh ${{ matrix.cuda-version }}
