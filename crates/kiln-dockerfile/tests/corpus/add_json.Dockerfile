FROM a
ADD ["a file.txt", "/dst/"]
