FROM --platform=linux/amd64 alpine AS runtime-amd64
FROM --platform=linux/arm64 alpine AS runtime-gpu
RUN true
