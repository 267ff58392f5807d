FROM a
ADD --exclude=*.txt --exclude=docs/ . /app
