FROM a
RUN python3 3<<EOF
print(1)
EOF
