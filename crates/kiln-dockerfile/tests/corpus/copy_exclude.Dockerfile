FROM a
COPY --exclude=node_modules --exclude=*.log . /app
