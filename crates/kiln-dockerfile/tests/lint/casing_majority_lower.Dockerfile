# lower the rest
from busybox as base
run true
RUN true
workdir /x
FROM base AS Next
env A=1
