FROM alpine
WORKDIR app
WORKDIR src
FROM alpine
WORKDIR /srv
WORKDIR data
