FROM a
RUN <<-EOF
	echo tabbed
		echo two tabs
	EOF
