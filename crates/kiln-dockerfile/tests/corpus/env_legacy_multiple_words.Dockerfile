FROM a
ENV MSG hello big world
