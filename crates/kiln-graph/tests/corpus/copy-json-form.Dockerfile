FROM busybox
ARG DIR=assets
COPY ["$DIR/app.js", "/srv/static/"]
