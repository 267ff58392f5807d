FROM a
COPY <<-END /x
	line
		END
