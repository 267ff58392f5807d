FROM a
COPY --keep-git-dir a b
