FROM --platform=$TARGETPLATFORM alpine AS base
RUN true
