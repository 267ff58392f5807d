FROM a
ADD --keep-git-dir=true https://github.com/moby/buildkit.git#v0.13.0 /src
