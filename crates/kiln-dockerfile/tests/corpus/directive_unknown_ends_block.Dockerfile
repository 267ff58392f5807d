# foo=bar
# escape=`
FROM a
