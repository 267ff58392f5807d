# escape=`
FROM a
ENV A=`$V B=\$V
