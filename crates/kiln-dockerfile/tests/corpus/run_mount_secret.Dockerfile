FROM a
RUN --mount=type=secret,id=npmrc,target=/root/.npmrc,required=true,mode=0400,uid=1000,gid=1000 npm ci
