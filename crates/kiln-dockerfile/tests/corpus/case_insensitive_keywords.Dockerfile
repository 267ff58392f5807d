from a AS B
run echo x
Copy . /
EnV a=b
WORKdir /x
