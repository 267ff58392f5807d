# escape=x
FROM a
