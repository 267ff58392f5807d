FROM a
ADD onlysource
