FROM a
CMD ["\u00e9", "\ud83d\ude00", "\ud800"]
