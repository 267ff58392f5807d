FROM a
ENV A=${}
