FROM a
RUN cat <<EOF > /etc/motd
welcome
EOF
