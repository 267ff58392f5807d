FROM busybox
ADD --link --keep-git-dir=true https://example.com/repo.git /src
