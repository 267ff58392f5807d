FROM a
ADD <<EOF /x
content
EOF
