# escape=`
FROM mcr.microsoft.com/windows/servercore:ltsc2022
SHELL ["powershell", "-Command", "$ErrorActionPreference = 'Stop';"]
ENV GOPATH=C:\gopath `
    GO111MODULE=off
RUN Write-Host one; `
  Write-Host two
WORKDIR ${GOPATH}\src\app
