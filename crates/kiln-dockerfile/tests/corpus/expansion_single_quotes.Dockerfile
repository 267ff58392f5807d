FROM a
ENV A='$V' B="$V" C=\$V
