FROM a
COPY . /app
