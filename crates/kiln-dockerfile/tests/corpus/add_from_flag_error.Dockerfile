FROM a
ADD --from=build /x /y
