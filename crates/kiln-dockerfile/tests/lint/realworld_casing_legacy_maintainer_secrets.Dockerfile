from alpine as Build
ENV A 1
MAINTAINER someone
FROM alpine AS final
ARG API_TOKEN=x
ENV PASSWORD=y
COPY --from=build /a /b
FROM alpine AS final
