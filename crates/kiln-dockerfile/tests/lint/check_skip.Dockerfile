# check=skip=StageNameCasing,JSONArgsRecommended
FROM busybox AS Build
CMD x
WORKDIR rel
