FROM a
RUN --mount=type=secret,id=token,env=TOKEN ./deploy.sh
