FROM a
CMD ["python", "app.py"]
