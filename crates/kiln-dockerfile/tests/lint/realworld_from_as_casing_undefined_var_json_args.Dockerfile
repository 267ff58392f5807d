FROM golang:1.22 as builder
WORKDIR /src
ENV GOFLAGS=-mod=vendor PATH=$GOPATH/bin:$PATH
CMD go run .
FROM scratch
COPY --from=builder /src/app /app
ENTRYPOINT /app
