
# escape=`
FROM a
