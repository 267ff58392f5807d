# check=skip=JSONArgsRecommended,StageNameCasing;error=true
FROM a
CMD echo hi
