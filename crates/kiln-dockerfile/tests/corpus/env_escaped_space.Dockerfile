FROM a
ENV A=hello\ world
