FROM a
CMD cat <<EOF
