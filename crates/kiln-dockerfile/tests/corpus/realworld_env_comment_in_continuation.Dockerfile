FROM python:3.11-slim
ARG USE_CUDA=false
ENV ENV=prod \
    PORT=8080 \
    # pass build args to the build
    USE_CUDA_DOCKER=${USE_CUDA} \
    OTHER="x y"
