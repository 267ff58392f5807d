FROM a
COPY ["my file.txt", "/dst dir/"]
