 FROM python:3.12
 WORKDIR /root/app
 COPY requirements.txt ./
 ENV PATH /usr/local/bin:$PATH
