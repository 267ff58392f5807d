FROM a
RUN echo end