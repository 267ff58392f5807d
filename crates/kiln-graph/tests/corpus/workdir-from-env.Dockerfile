FROM busybox
ENV APP_HOME=/opt/app
WORKDIR $APP_HOME/current
RUN pwd
