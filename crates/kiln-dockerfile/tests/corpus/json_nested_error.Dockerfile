FROM a
CMD [["a"]]
