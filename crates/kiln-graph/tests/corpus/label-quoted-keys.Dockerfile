FROM busybox
ARG V=2
LABEL "com.example.key"="value one" version=$V
