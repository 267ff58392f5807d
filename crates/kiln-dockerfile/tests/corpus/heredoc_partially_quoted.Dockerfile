FROM a
RUN <<E"O"F
echo $HOME
EOF
