FROM a
RUN --mount=type=ssh,id=default,required git clone git@github.com:x/y
