FROM a
RUN <<'EOF'
echo $HOME
EOF
